// libnvidia-ml.so.1 for tests: a stand-in for NVML over the CUDA stand-in's devices, so that
// headroom's telemetry, the `/devices` and `/metrics` fields and the 409 rule for a GPU that
// another process computes on run in tests. Memory in use follows the driver stand-in's ledger;
// foreign processes, utilisation and temperature come from the environment (see driver.cpp).
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "standin.h"

#define EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using nvmlReturn_t = int;
enum : nvmlReturn_t {
    NVML_SUCCESS = 0,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
};

// A device handle is its index plus one, so that no handle is null.
using nvmlDevice_t = std::uintptr_t;

struct nvmlMemory_t {
    unsigned long long total, free, used;
};

struct nvmlMemory_v2_t {
    unsigned version;
    unsigned long long total, reserved, free, used;
};

struct nvmlUtilization_t {
    unsigned gpu, memory;
};

struct nvmlProcessInfo_t {
    unsigned pid;
    unsigned long long usedGpuMemory;
    unsigned gpuInstanceId, computeInstanceId;
};

bool valid(nvmlDevice_t device) {
    return device >= 1 && device <= static_cast<nvmlDevice_t>(headroom_standin_device_count());
}

int index_of(nvmlDevice_t device) { return static_cast<int>(device) - 1; }

nvmlReturn_t copy_text(char* out, unsigned length, const char* text) {
    if (out == nullptr) return NVML_ERROR_INVALID_ARGUMENT;
    if (std::strlen(text) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    std::memcpy(out, text, std::strlen(text) + 1);
    return NVML_SUCCESS;
}

}  // namespace

EXPORT nvmlReturn_t nvmlInit_v2() {
    headroom_standin_nvml_delay();
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned) { return NVML_SUCCESS; }

EXPORT nvmlReturn_t nvmlShutdown() { return NVML_SUCCESS; }

EXPORT const char* nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
        case NVML_SUCCESS: return "Success";
        case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
        case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
        default: return "Unknown Error";
    }
}

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char* version, unsigned length) {
    return copy_text(version, length, "580.00-standin");
}

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned* count) {
    if (count == nullptr) return NVML_ERROR_INVALID_ARGUMENT;
    *count = static_cast<unsigned>(headroom_standin_device_count());
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned index, nvmlDevice_t* device) {
    if (device == nullptr || !valid(index + 1)) return NVML_ERROR_INVALID_ARGUMENT;
    *device = index + 1;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned* index) {
    if (index == nullptr || !valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    *index = static_cast<unsigned>(index_of(device));
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char* name, unsigned length) {
    if (!valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    return copy_text(name, length, headroom_standin_name(index_of(device)));
}

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char* uuid, unsigned length) {
    if (!valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    char text[96];
    headroom_standin_uuid(index_of(device), text, sizeof text);
    return copy_text(uuid, length, text);
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t* memory) {
    if (memory == nullptr || !valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    std::uint64_t total, used;
    headroom_standin_memory(index_of(device), &total, &used);
    *memory = nvmlMemory_t{total, total - used, used};
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t* memory) {
    if (memory == nullptr || !valid(device) || (memory->version >> 24) != 2) return NVML_ERROR_INVALID_ARGUMENT;
    std::uint64_t total, used;
    headroom_standin_memory(index_of(device), &total, &used);
    *memory = nvmlMemory_v2_t{memory->version, total, 0, total - used, used};
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t* utilization) {
    if (utilization == nullptr || !valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    *utilization = nvmlUtilization_t{headroom_standin_utilization(), 0};
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, int sensor, unsigned* temperature) {
    if (temperature == nullptr || sensor != 0 || !valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    *temperature = headroom_standin_temperature();
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned* count,
                                                            nvmlProcessInfo_t* infos) {
    if (count == nullptr || !valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned pids[64];
    std::uint64_t bytes[64];
    const unsigned found = static_cast<unsigned>(headroom_standin_processes(index_of(device), pids, bytes, 64));
    if (infos == nullptr || *count < found) {
        const bool fits = found == 0;
        *count = found;
        return fits ? NVML_SUCCESS : NVML_ERROR_INSUFFICIENT_SIZE;
    }
    for (unsigned i = 0; i < found; ++i) infos[i] = nvmlProcessInfo_t{pids[i], bytes[i], 0xffffffffu, 0xffffffffu};
    *count = found;
    return NVML_SUCCESS;
}
