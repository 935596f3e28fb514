// libcuda.so.1 for tests: a CPU stand-in for the CUDA driver API, under cudarc and headroom's
// launchers, with the kernels of kernels/*.cu run by the emulation in tests/emulation/.
//
// It implements the entry points headroom's paths call and nothing else: cudarc resolves each
// symbol on first use and panics naming one that is missing, so a gap shows at once. Device
// memory is host memory (so kernels dereference device pointers directly), charged against a
// budget with the driver's rounding; memory pools keep freed memory reserved until trimmed;
// faults are injected from the environment. It proves headroom's Rust side and the kernels'
// arithmetic; it says nothing about speed or what only hardware does.
//
// Environment (read once):
//   HEADROOM_STANDIN_MEMORY        device memory, e.g. 64MiB (default 256MiB)
//   HEADROOM_STANDIN_DEVICES       number of devices (default 1)
//   HEADROOM_STANDIN_FAIL_LAUNCH   N, N:ecc, N:hang, N:print-hang or N:crash: the Nth kernel
//                                  launch of the process faults with CUDA_ERROR_ILLEGAL_ADDRESS
//                                  (or _ECC_UNCORRECTABLE), never returns (print-hang: after
//                                  printing a line to standard output, as a library might), or
//                                  aborts the process.
//                                  A fault is sticky for the whole process, as NVIDIA documents:
//                                  every later call fails with it, resets and new contexts too
//   HEADROOM_STANDIN_FAIL_LAUNCH_FILE a file holding the same, read at every launch while it
//                                  exists: the fault fires once, in whichever process reaches
//                                  its Nth launch first, and removes the file, unless the text
//                                  ends with `:repeat` (then every process faults)
//   HEADROOM_STANDIN_STATE_DIR     a directory where each process with a context leaves a file,
//                                  so that NVML lists the compute processes of every process
//                                  using the stand-in, as the real NVML does
//   HEADROOM_STANDIN_OOM_AT_SYNC   1: an allocation past the budget succeeds, work after it is
//                                  skipped and the next synchronise reports out-of-memory
//   HEADROOM_STANDIN_LEAK_FREE     N: the Nth free keeps its allocation (a leak to be caught)
//   HEADROOM_STANDIN_TRIM_KEEPS    bytes: a pool trim keeps up to this much reserved, as a real
//                                  pool may (not a leak: no allocation is live in it)
//   HEADROOM_STANDIN_PROCESSES     pid:bytes,...: foreign compute processes on device 0
//   HEADROOM_STANDIN_FOREIGN_ALLOC N:bytes: at the Nth launch a foreign process takes bytes
//   HEADROOM_STANDIN_NO_POOLS      1: advertise no memory pools (cudarc then allocates
//                                  synchronously)
//   HEADROOM_STANDIN_REPORT        a file: at exit, what was still held, as JSON (and how many
//                                  step intervals were read from event pairs)
//   HEADROOM_STANDIN_ELAPSED       nan, inf or a number: what every cuEventElapsedTime reports,
//                                  in milliseconds (a timer that cannot be trusted)
//   HEADROOM_STANDIN_NVML_DELAY_FILE a file holding milliseconds: while it exists, every NVML
//                                  initialisation takes that long (a slow NVML, as on a busy node)
//   HEADROOM_STANDIN_REFUSE_CUBIN  1: refuse CUBIN images (CUDA_ERROR_NO_BINARY_FOR_GPU), as a
//                                  driver does for another architecture; PTX still loads
//   CUDA_VISIBLE_DEVICES           as the driver reads it: the GPUs this process sees, numbered
//                                  from 0 in that order
#include <dirent.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "../emulation/emulate.h"
#include "standin.h"

#define EXPORT extern "C" __attribute__((visibility("default")))

namespace {

// ---- the driver API's types, as cuda.h declares them ---------------------------------------

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = std::uint64_t;
using CUstream = void*;
using CUmemoryPool = void*;

enum : CUresult {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_NO_BINARY_FOR_GPU = 209,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_ECC_UNCORRECTABLE = 214,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};

const char* error_name(CUresult error) {
    switch (error) {
        case CUDA_SUCCESS: return "CUDA_SUCCESS";
        case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
        case CUDA_ERROR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
        case CUDA_ERROR_NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
        case CUDA_ERROR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
        case CUDA_ERROR_INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
        case CUDA_ERROR_NO_BINARY_FOR_GPU: return "CUDA_ERROR_NO_BINARY_FOR_GPU";
        case CUDA_ERROR_INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
        case CUDA_ERROR_ECC_UNCORRECTABLE: return "CUDA_ERROR_ECC_UNCORRECTABLE";
        case CUDA_ERROR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
        case CUDA_ERROR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
        case CUDA_ERROR_ILLEGAL_ADDRESS: return "CUDA_ERROR_ILLEGAL_ADDRESS";
        case CUDA_ERROR_NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
        default: return nullptr;
    }
}

const char* error_text(CUresult error) {
    switch (error) {
        case CUDA_SUCCESS: return "no error";
        case CUDA_ERROR_INVALID_VALUE: return "invalid argument";
        case CUDA_ERROR_OUT_OF_MEMORY: return "out of memory";
        case CUDA_ERROR_NOT_INITIALIZED: return "initialization error";
        case CUDA_ERROR_INVALID_DEVICE: return "invalid device ordinal";
        case CUDA_ERROR_INVALID_IMAGE: return "device kernel image is invalid";
        case CUDA_ERROR_NO_BINARY_FOR_GPU: return "no kernel image is available for execution on the device";
        case CUDA_ERROR_INVALID_CONTEXT: return "invalid device context";
        case CUDA_ERROR_ECC_UNCORRECTABLE: return "uncorrectable ECC error encountered";
        case CUDA_ERROR_INVALID_HANDLE: return "invalid resource handle";
        case CUDA_ERROR_NOT_FOUND: return "named symbol not found";
        case CUDA_ERROR_ILLEGAL_ADDRESS: return "an illegal memory access was encountered";
        case CUDA_ERROR_NOT_SUPPORTED: return "operation not supported";
        default: return nullptr;
    }
}

enum DeviceAttribute {
    MAX_THREADS_PER_BLOCK = 1,
    MAX_BLOCK_DIM_X = 2,
    MAX_BLOCK_DIM_Y = 3,
    MAX_BLOCK_DIM_Z = 4,
    MAX_GRID_DIM_X = 5,
    MAX_GRID_DIM_Y = 6,
    MAX_GRID_DIM_Z = 7,
    MAX_SHARED_MEMORY_PER_BLOCK = 8,
    WARP_SIZE = 10,
    MULTIPROCESSOR_COUNT = 16,
    COMPUTE_CAPABILITY_MAJOR = 75,
    COMPUTE_CAPABILITY_MINOR = 76,
    MEMORY_POOLS_SUPPORTED = 115,
};

enum PoolAttribute {
    RELEASE_THRESHOLD = 4,
    RESERVED_MEM_CURRENT = 5,
    RESERVED_MEM_HIGH = 6,
    USED_MEM_CURRENT = 7,
    USED_MEM_HIGH = 8,
};

// The shape of an H100 SXM, which headroom's launch shapes are written for.
constexpr int kMultiprocessors = 132;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kSharedMemoryPerBlock = 48 * 1024;
constexpr std::uint64_t kMaxGridX = 2147483647ull, kMaxGridYZ = 65535;

// Allocation rounding: 2 MiB pages from 1 MiB up, 512 bytes below.
constexpr std::uint64_t kLargePage = 2ull << 20, kLargeFrom = 1ull << 20, kSmallGranule = 512;
constexpr std::size_t kHostPage = 4096;

std::uint64_t round_up(std::uint64_t value, std::uint64_t to) { return (value + to - 1) / to * to; }

std::uint64_t charged_bytes(std::uint64_t bytes) {
    return bytes >= kLargeFrom ? round_up(bytes, kLargePage) : round_up(bytes, kSmallGranule);
}

// ---- configuration ---------------------------------------------------------------------------

std::uint64_t parse_size(const char* text, std::uint64_t fallback) {
    if (text == nullptr || *text == '\0') return fallback;
    char* end = nullptr;
    const double value = std::strtod(text, &end);
    std::string unit(end);
    unit.erase(std::remove(unit.begin(), unit.end(), ' '), unit.end());
    std::uint64_t scale = 1;
    if (unit == "KiB") scale = 1ull << 10;
    else if (unit == "MiB") scale = 1ull << 20;
    else if (unit == "GiB") scale = 1ull << 30;
    else if (unit == "KB") scale = 1000;
    else if (unit == "MB") scale = 1000 * 1000;
    else if (unit == "GB") scale = 1000ull * 1000 * 1000;
    else if (!unit.empty() && unit != "B") {
        std::fprintf(stderr, "CUDA stand-in: cannot read the size `%s`\n", text);
        std::abort();
    }
    return static_cast<std::uint64_t>(value * static_cast<double>(scale));
}

struct ForeignProcess {
    unsigned pid;
    std::uint64_t bytes;
};

struct Config {
    std::uint64_t memory = 256ull << 20;
    int devices = 1;
    std::uint64_t fail_launch = 0;
    CUresult fail_with = CUDA_ERROR_ILLEGAL_ADDRESS;
    enum class Failure { Fault, Hang, PrintHang, Crash } failure = Failure::Fault;
    std::string fail_file;
    std::string state_dir;
    bool oom_at_sync = false;
    std::uint64_t leak_free = 0;
    std::uint64_t trim_keeps = 0;
    std::vector<ForeignProcess> processes;
    std::uint64_t foreign_launch = 0;
    std::uint64_t foreign_bytes = 0;
    bool pools = true;
    bool refuse_cubin = false;
    std::string report;
    unsigned utilization = 0;
    unsigned temperature = 35;
    bool elapsed_set = false;
    float elapsed = 0;
    std::string nvml_delay_file;
};

// `N`, `N:ecc`, `N:hang`, `N:print-hang` or `N:crash` into the launch and failure of `c`.
void parse_failure(const std::string& text, Config& c) {
    if (text.empty()) return;
    c.fail_launch = std::strtoull(text.c_str(), nullptr, 10);
    if (text.find(":ecc") != std::string::npos) c.fail_with = CUDA_ERROR_ECC_UNCORRECTABLE;
    if (text.find(":hang") != std::string::npos) c.failure = Config::Failure::Hang;
    if (text.find(":print-hang") != std::string::npos) c.failure = Config::Failure::PrintHang;
    if (text.find(":crash") != std::string::npos) c.failure = Config::Failure::Crash;
}

// Every piece of state is created on first use and never destroyed: the process may exit while
// other threads still call in, and the report at exit reads it.
const Config& config() {
    static const Config* loaded = new Config([] {
        Config c;
        c.memory = parse_size(std::getenv("HEADROOM_STANDIN_MEMORY"), c.memory);
        if (const char* n = std::getenv("HEADROOM_STANDIN_DEVICES")) c.devices = std::atoi(n);
        std::string fail_text;
        if (const char* fail = std::getenv("HEADROOM_STANDIN_FAIL_LAUNCH")) fail_text = fail;
        parse_failure(fail_text, c);
        if (const char* path = std::getenv("HEADROOM_STANDIN_FAIL_LAUNCH_FILE")) c.fail_file = path;
        if (const char* dir = std::getenv("HEADROOM_STANDIN_STATE_DIR")) c.state_dir = dir;
        if (const char* oom = std::getenv("HEADROOM_STANDIN_OOM_AT_SYNC")) c.oom_at_sync = std::strcmp(oom, "1") == 0;
        if (const char* leak = std::getenv("HEADROOM_STANDIN_LEAK_FREE")) c.leak_free = std::strtoull(leak, nullptr, 10);
        c.trim_keeps = parse_size(std::getenv("HEADROOM_STANDIN_TRIM_KEEPS"), 0);
        if (const char* list = std::getenv("HEADROOM_STANDIN_PROCESSES")) {
            std::string text(list);
            std::size_t start = 0;
            while (start < text.size()) {
                const std::size_t comma = std::min(text.find(',', start), text.size());
                const std::string item = text.substr(start, comma - start);
                const std::size_t colon = item.find(':');
                if (colon != std::string::npos) {
                    c.processes.push_back(ForeignProcess{static_cast<unsigned>(std::strtoul(item.c_str(), nullptr, 10)),
                                                        parse_size(item.c_str() + colon + 1, 0)});
                }
                start = comma + 1;
            }
        }
        if (const char* foreign = std::getenv("HEADROOM_STANDIN_FOREIGN_ALLOC")) {
            c.foreign_launch = std::strtoull(foreign, nullptr, 10);
            if (const char* colon = std::strchr(foreign, ':')) c.foreign_bytes = parse_size(colon + 1, 0);
        }
        if (const char* no_pools = std::getenv("HEADROOM_STANDIN_NO_POOLS")) c.pools = std::strcmp(no_pools, "1") != 0;
        if (const char* report = std::getenv("HEADROOM_STANDIN_REPORT")) c.report = report;
        if (const char* refuse = std::getenv("HEADROOM_STANDIN_REFUSE_CUBIN")) c.refuse_cubin = std::strcmp(refuse, "1") == 0;
        if (const char* u = std::getenv("HEADROOM_STANDIN_UTILIZATION")) c.utilization = std::atoi(u);
        if (const char* t = std::getenv("HEADROOM_STANDIN_TEMPERATURE")) c.temperature = std::atoi(t);
        if (const char* e = std::getenv("HEADROOM_STANDIN_ELAPSED")) {
            c.elapsed_set = true;
            c.elapsed = std::strtof(e, nullptr);
        }
        if (const char* f = std::getenv("HEADROOM_STANDIN_NVML_DELAY_FILE")) c.nvml_delay_file = f;
        return c;
    }());
    return *loaded;
}

// ---- devices, contexts, memory -------------------------------------------------------------

struct Allocation {
    std::uint64_t bytes;    // asked for
    std::uint64_t charged;  // after the driver's rounding
    bool pooled;
    bool deferred;          // past the budget under HEADROOM_STANDIN_OOM_AT_SYNC: no memory behind it
    void* mapping;
    std::size_t mapping_bytes;
};

struct Module {
    int device;
    std::uint64_t generation;
    std::set<std::string> entries;
};

struct Function {
    Module* module;
    const emulation::Kernel* kernel;
};

struct Device;

// The primary context of a device: retained, reset and released as the driver's is.
struct Context {
    Device* device;
};

struct Device {
    int ordinal = 0;
    // Its index among all the stand-in's GPUs, as NVML numbers them (CUDA_VISIBLE_DEVICES
    // renumbers ordinals, not GPUs).
    int physical = 0;
    Context context{this};
    std::atomic<int> retains{0};
    std::uint64_t generation = 1;  // bumped by every reset or final release: old handles die
    CUresult sticky = CUDA_SUCCESS;
    bool pending_oom = false;
    std::atomic<std::uint64_t> pool_reserved{0}, pool_used{0}, sync_used{0};
    std::uint64_t pool_reserved_high = 0, pool_used_high = 0;
    std::map<std::uintptr_t, Allocation> allocations;
};

std::mutex driver_mutex;  // every entry point that touches state holds it
bool initialised = false;
std::atomic<std::uint64_t> launches{0};
// A sticky error, once raised, for the rest of the process (NVIDIA: "the process must be
// terminated and relaunched"): no reset or new context clears it.
std::atomic<CUresult> process_sticky{CUDA_SUCCESS};
std::atomic<std::uint64_t> foreign_taken{0};  // bytes of HEADROOM_STANDIN_FOREIGN_ALLOC, once due
std::uint64_t frees = 0;
std::atomic<const char*> running_kernel{nullptr};
thread_local Context* current = nullptr;

std::set<Module*>& modules() {
    static auto* all = new std::set<Module*>();
    return *all;
}

std::set<Function*>& functions() {
    static auto* all = new std::set<Function*>();
    return *all;
}

std::vector<Device*>& devices() {
    static auto* all = new std::vector<Device*>([] {
        std::vector<int> visible;
        if (const char* only = std::getenv("CUDA_VISIBLE_DEVICES")) {
            for (const char* at = only; *at != '\0';) {
                char* end = nullptr;
                const long index = std::strtol(at, &end, 10);
                if (end == at) break;  // as the driver does: the list stops at what it cannot read
                if (index >= 0 && index < config().devices) visible.push_back(static_cast<int>(index));
                at = *end == ',' ? end + 1 : end;
                if (*end != ',') break;
            }
        } else {
            for (int i = 0; i < config().devices; ++i) visible.push_back(i);
        }
        std::vector<Device*> list;
        for (int physical : visible) {
            list.push_back(new Device());
            list.back()->ordinal = static_cast<int>(list.size()) - 1;
            list.back()->physical = physical;
        }
        return list;
    }());
    return *all;
}

Device* device_of(CUdevice ordinal) {
    auto& all = devices();
    return ordinal >= 0 && ordinal < static_cast<int>(all.size()) ? all[ordinal] : nullptr;
}

std::uint64_t foreign_bytes(const Device& device) {
    if (device.physical != 0) return 0;
    std::uint64_t bytes = foreign_taken.load();
    for (const ForeignProcess& p : config().processes) bytes += p.bytes;
    return bytes;
}

std::uint64_t held_bytes(const Device& device) { return device.pool_reserved.load() + device.sync_used.load(); }

std::uint64_t free_bytes(const Device& device) {
    const std::uint64_t taken = foreign_bytes(device) + held_bytes(device);
    return taken >= config().memory ? 0 : config().memory - taken;
}

// Host memory behind a device allocation, its end against a guard page so that a kernel that
// runs far past a buffer faults instead of corrupting a neighbour.
void* map_memory(std::uint64_t bytes, void** mapping, std::size_t* mapping_bytes) {
    const std::size_t body = round_up(bytes, kHostPage);
    const std::size_t total = body + 2 * kHostPage;
    void* base = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) return nullptr;
    auto* bytes_base = static_cast<unsigned char*>(base);
    mprotect(bytes_base, kHostPage, PROT_NONE);
    mprotect(bytes_base + kHostPage + body, kHostPage, PROT_NONE);
    *mapping = base;
    *mapping_bytes = total;
    return bytes_base + kHostPage + body - round_up(bytes, 256);
}

// An address range no allocation uses, for allocations that only exist as a deferred error.
std::uintptr_t deferred_address(std::uint64_t bytes) {
    static std::uintptr_t next = 0;
    static constexpr std::size_t kRange = 1ull << 40;
    if (next == 0) {
        void* range = mmap(nullptr, kRange, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        next = reinterpret_cast<std::uintptr_t>(range);
    }
    const std::uintptr_t address = next;
    next += round_up(std::max<std::uint64_t>(bytes, 1), kLargePage);
    return address;
}

void destroy_allocations(Device& device) {
    for (auto& [address, allocation] : device.allocations) {
        if (allocation.mapping != nullptr) munmap(allocation.mapping, allocation.mapping_bytes);
    }
    device.allocations.clear();
    device.pool_reserved = 0;
    device.pool_used = 0;
    device.sync_used = 0;
}

// What a reset or the last release does: frees everything and invalidates old handles.
void reset_state(Device& device) {
    destroy_allocations(device);
    device.sticky = process_sticky.load();
    device.pending_oom = false;
    ++device.generation;
}

// The live allocation holding [address, address + bytes), or nullptr.
Allocation* find_range(Device& device, std::uintptr_t address, std::uint64_t bytes) {
    auto it = device.allocations.upper_bound(address);
    if (it == device.allocations.begin()) return nullptr;
    --it;
    Allocation& allocation = it->second;
    if (allocation.deferred || address - it->first + bytes > allocation.bytes) return nullptr;
    return &allocation;
}

// The current context's device, or the error a call made now gets.
CUresult current_device(Device** out) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (CUresult sticky = process_sticky.load()) return sticky;
    if (current == nullptr) return CUDA_ERROR_INVALID_CONTEXT;
    Device& device = *current->device;
    if (device.retains == 0) return CUDA_ERROR_INVALID_CONTEXT;
    if (device.sticky != CUDA_SUCCESS) return device.sticky;
    *out = &device;
    return CUDA_SUCCESS;
}

CUresult allocate(CUdeviceptr* out, std::uint64_t bytes, bool pooled) {
    Device* device;
    if (CUresult error = current_device(&device)) return error;
    if (out == nullptr || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    const std::uint64_t charged = bytes > config().memory ? bytes : charged_bytes(bytes);
    std::uint64_t growth = charged;
    if (pooled) {
        const std::uint64_t room = device->pool_reserved - device->pool_used;
        growth = charged > room ? charged - room : 0;
    }
    if (growth > free_bytes(*device) || bytes > config().memory) {
        if (!config().oom_at_sync) return CUDA_ERROR_OUT_OF_MEMORY;
        // The failure surfaces at the next synchronise; nothing runs on the stream until then.
        const std::uintptr_t address = deferred_address(bytes);
        device->allocations[address] = Allocation{bytes, 0, pooled, true, nullptr, 0};
        device->pending_oom = true;
        *out = address;
        return CUDA_SUCCESS;
    }
    Allocation allocation{bytes, charged, pooled, false, nullptr, 0};
    void* memory = map_memory(bytes, &allocation.mapping, &allocation.mapping_bytes);
    if (memory == nullptr) return CUDA_ERROR_OUT_OF_MEMORY;
    if (pooled) {
        device->pool_reserved += growth;
        device->pool_used += charged;
        device->pool_reserved_high = std::max(device->pool_reserved_high, device->pool_reserved.load());
        device->pool_used_high = std::max(device->pool_used_high, device->pool_used.load());
    } else {
        device->sync_used += charged;
    }
    const auto address = reinterpret_cast<std::uintptr_t>(memory);
    device->allocations[address] = allocation;
    *out = address;
    return CUDA_SUCCESS;
}

CUresult release(CUdeviceptr address) {
    Device* device;
    if (CUresult error = current_device(&device)) return error;
    auto it = device->allocations.find(address);
    if (it == device->allocations.end()) return CUDA_ERROR_INVALID_VALUE;  // not allocated, or freed twice
    if (++frees == config().leak_free) return CUDA_SUCCESS;                // kept: the injected leak
    Allocation& allocation = it->second;
    if (!allocation.deferred) {
        if (allocation.pooled) device->pool_used -= allocation.charged;  // stays reserved until a trim
        else device->sync_used -= allocation.charged;
        munmap(allocation.mapping, allocation.mapping_bytes);
    }
    device->allocations.erase(it);
    return CUDA_SUCCESS;
}

bool valid_stream(CUstream stream) {
    const auto value = reinterpret_cast<std::uintptr_t>(stream);
    return value <= 2;  // the null stream, CU_STREAM_LEGACY or CU_STREAM_PER_THREAD
}

CUresult synchronize() {
    Device* device;
    if (CUresult error = current_device(&device)) return error;
    if (device->pending_oom) {
        device->pending_oom = false;
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    return CUDA_SUCCESS;
}

// ---- faults inside kernels -----------------------------------------------------------------

struct sigaction previous_segv;

void on_segv(int signal, siginfo_t* info, void* context) {
    if (const char* kernel = running_kernel.load()) {
        char message[256];
        const int length = std::snprintf(message, sizeof message,
                                         "CUDA stand-in: kernel `%s` touched memory outside every live allocation "
                                         "(address %p); on a GPU this is CUDA_ERROR_ILLEGAL_ADDRESS\n",
                                         kernel, info->si_addr);
        if (length > 0) (void)!write(STDERR_FILENO, message, static_cast<std::size_t>(length));
        ::signal(SIGSEGV, SIG_DFL);
        return;  // the access faults again, now fatally
    }
    if (previous_segv.sa_flags & SA_SIGINFO) {
        previous_segv.sa_sigaction(signal, info, context);
    } else if (previous_segv.sa_handler == SIG_DFL || previous_segv.sa_handler == SIG_IGN) {
        ::signal(SIGSEGV, SIG_DFL);
    } else {
        previous_segv.sa_handler(signal);
    }
}

void install_fault_handler() {
    struct sigaction action {};
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &previous_segv);
}

struct LaunchCheck {
    Device* device;
    const char* kernel;
};

bool pointer_is_live(unsigned index, const void* pointer, void* context) {
    auto* check = static_cast<LaunchCheck*>(context);
    if (find_range(*check->device, reinterpret_cast<std::uintptr_t>(pointer), 1) != nullptr) return true;
    std::fprintf(stderr,
                 "CUDA stand-in: kernel `%s` argument %u (%p) is not in a live allocation; the context now "
                 "reports CUDA_ERROR_ILLEGAL_ADDRESS\n",
                 check->kernel, index, pointer);
    return false;
}

// The file that says this process holds a context on `device`, in the state directory.
std::string context_file(int ordinal, long pid) {
    return config().state_dir + "/" + std::to_string(ordinal) + "." + std::to_string(pid);
}

void mark_context(const Device& device, bool held) {
    if (config().state_dir.empty()) return;
    const std::string path = context_file(device.physical, static_cast<long>(getpid()));
    if (held) {
        if (FILE* file = std::fopen(path.c_str(), "w")) std::fclose(file);
    } else {
        std::remove(path.c_str());
    }
}

// Other live processes with a context on `ordinal`, from the state directory.
std::vector<unsigned> other_context_processes(int ordinal) {
    std::vector<unsigned> pids;
    if (config().state_dir.empty()) return pids;
    DIR* dir = opendir(config().state_dir.c_str());
    if (dir == nullptr) return pids;
    const std::string prefix = std::to_string(ordinal) + ".";
    while (dirent* entry = readdir(dir)) {
        const std::string name = entry->d_name;
        if (name.rfind(prefix, 0) != 0) continue;
        const long pid = std::strtol(name.c_str() + prefix.size(), nullptr, 10);
        if (pid <= 0 || pid == static_cast<long>(getpid())) continue;
        if (kill(static_cast<pid_t>(pid), 0) != 0) continue;  // it died without releasing
        pids.push_back(static_cast<unsigned>(pid));
    }
    closedir(dir);
    return pids;
}

// The global functions of a CUDA ELF image (EM_CUDA, 64-bit) into `entries`; false when the
// image is not one.
bool cubin_entries(const unsigned char* elf, std::set<std::string>& entries) {
    auto read = [elf](std::size_t at, std::size_t bytes) {
        std::uint64_t value = 0;
        std::memcpy(&value, elf + at, bytes);
        return value;
    };
    constexpr std::uint64_t kEmCuda = 190, kSymtab = 2, kFunc = 2, kGlobal = 1;
    if (elf[4] != 2 || read(0x12, 2) != kEmCuda) return false;
    const std::uint64_t sections = read(0x28, 8), size = read(0x3a, 2), count = read(0x3c, 2);
    for (std::uint64_t i = 0; i < count; ++i) {
        const std::size_t header = sections + i * size;
        if (read(header + 4, 4) != kSymtab) continue;
        const std::uint64_t symbols = read(header + 0x18, 8), bytes = read(header + 0x20, 8);
        const std::size_t strings = read(sections + read(header + 0x28, 4) * size + 0x18, 8);
        for (std::uint64_t at = symbols; at + 24 <= symbols + bytes; at += 24) {
            const unsigned info = elf[at + 4];
            if ((info & 0xf) == kFunc && (info >> 4) == kGlobal)
                entries.insert(reinterpret_cast<const char*>(elf + strings + read(at, 4)));
        }
    }
    return !entries.empty();
}

// Events alive, and intervals read from pairs of them (cuEventElapsedTime), for the report.
std::atomic<std::uint64_t> live_events{0};
std::atomic<std::uint64_t> timed_intervals{0};

void write_report() {
    if (!initialised || config().report.empty()) return;
    std::FILE* file = std::fopen(config().report.c_str(), "w");
    if (file == nullptr) return;
    std::uint64_t allocations = 0, bytes = 0, reserved = 0, retained = 0;
    for (Device* device : devices()) {
        allocations += device->allocations.size();
        for (auto& [address, allocation] : device->allocations) bytes += allocation.bytes;
        reserved += device->pool_reserved;
        retained += static_cast<std::uint64_t>(device->retains.load());
    }
    std::fprintf(file,
                 "{\"launches\": %llu, \"live_allocations\": %llu, \"live_bytes\": %llu, "
                 "\"pool_reserved_bytes\": %llu, \"retained_contexts\": %llu, \"loaded_modules\": %zu, "
                 "\"live_events\": %llu, \"timed_intervals\": %llu}\n",
                 static_cast<unsigned long long>(launches.load()), static_cast<unsigned long long>(allocations),
                 static_cast<unsigned long long>(bytes), static_cast<unsigned long long>(reserved),
                 static_cast<unsigned long long>(retained), modules().size(),
                 static_cast<unsigned long long>(live_events.load()),
                 static_cast<unsigned long long>(timed_intervals.load()));
    std::fclose(file);
}

__attribute__((destructor)) void at_exit() { write_report(); }

void copy_name(char* out, int length, const char* name) {
    if (out == nullptr || length <= 0) return;
    std::snprintf(out, static_cast<std::size_t>(length), "%s", name);
}

}  // namespace

// ---- the driver API ------------------------------------------------------------------------

EXPORT CUresult cuInit(unsigned flags) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    if (!initialised) install_fault_handler();
    initialised = true;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDriverGetVersion(int* version) {
    if (version == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *version = 13000;
    return CUDA_SUCCESS;
}

// NVRTC asks a loaded driver for its private export tables; the stand-in has none, which NVRTC
// takes as "no driver features to use".
EXPORT CUresult cuGetExportTable(const void** table, const void* id) {
    if (table == nullptr || id == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *table = nullptr;
    return CUDA_ERROR_NOT_SUPPORTED;
}

EXPORT CUresult cuGetErrorName(CUresult error, const char** name) {
    if (name == nullptr || error_name(error) == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *name = error_name(error);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuGetErrorString(CUresult error, const char** text) {
    if (text == nullptr || error_text(error) == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *text = error_text(error);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetCount(int* count) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (count == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *count = static_cast<int>(devices().size());
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGet(CUdevice* device, int ordinal) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (device == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (device_of(ordinal) == nullptr) return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetName(char* name, int length, CUdevice ordinal) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (device_of(ordinal) == nullptr) return CUDA_ERROR_INVALID_DEVICE;
    if (name == nullptr || length <= 0) return CUDA_ERROR_INVALID_VALUE;
    copy_name(name, length, headroom_standin_name(ordinal));
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceTotalMem_v2(std::size_t* bytes, CUdevice ordinal) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (device_of(ordinal) == nullptr) return CUDA_ERROR_INVALID_DEVICE;
    if (bytes == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *bytes = config().memory;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetUuid(unsigned char* uuid, CUdevice ordinal) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (device_of(ordinal) == nullptr) return CUDA_ERROR_INVALID_DEVICE;
    if (uuid == nullptr) return CUDA_ERROR_INVALID_VALUE;
    const unsigned char bytes[16] = {0x57, 0xa4, 0xd1, 0x00, 0x00, 0x00, 0x40, 0x00,
                                     0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, static_cast<unsigned char>(device_of(ordinal)->physical)};
    std::memcpy(uuid, bytes, sizeof bytes);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice ordinal) { return cuDeviceGetUuid(uuid, ordinal); }

EXPORT CUresult cuDeviceGetAttribute(int* value, int attribute, CUdevice ordinal) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (device_of(ordinal) == nullptr) return CUDA_ERROR_INVALID_DEVICE;
    if (value == nullptr) return CUDA_ERROR_INVALID_VALUE;
    switch (attribute) {
        case MAX_THREADS_PER_BLOCK: *value = kMaxThreadsPerBlock; break;
        case MAX_BLOCK_DIM_X:
        case MAX_BLOCK_DIM_Y: *value = 1024; break;
        case MAX_BLOCK_DIM_Z: *value = 64; break;
        case MAX_GRID_DIM_X: *value = static_cast<int>(kMaxGridX); break;
        case MAX_GRID_DIM_Y:
        case MAX_GRID_DIM_Z: *value = static_cast<int>(kMaxGridYZ); break;
        case MAX_SHARED_MEMORY_PER_BLOCK: *value = kSharedMemoryPerBlock; break;
        case WARP_SIZE: *value = 32; break;
        case MULTIPROCESSOR_COUNT: *value = kMultiprocessors; break;
        case COMPUTE_CAPABILITY_MAJOR: *value = 9; break;
        case COMPUTE_CAPABILITY_MINOR: *value = 0; break;
        case MEMORY_POOLS_SUPPORTED: *value = config().pools ? 1 : 0; break;
        default:
            std::fprintf(stderr, "CUDA stand-in: device attribute %d is not emulated\n", attribute);
            return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDevicePrimaryCtxRetain(Context** context, CUdevice ordinal) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (CUresult sticky = process_sticky.load()) return sticky;
    Device* device = device_of(ordinal);
    if (device == nullptr) return CUDA_ERROR_INVALID_DEVICE;
    if (context == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (++device->retains == 1) mark_context(*device, true);
    *context = &device->context;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice ordinal) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    if (CUresult sticky = process_sticky.load()) return sticky;
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    Device* device = device_of(ordinal);
    if (device == nullptr) return CUDA_ERROR_INVALID_DEVICE;
    if (device->retains == 0) return CUDA_ERROR_INVALID_CONTEXT;
    if (--device->retains == 0) {
        reset_state(*device);
        mark_context(*device, false);
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDevicePrimaryCtxReset_v2(CUdevice ordinal) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (CUresult sticky = process_sticky.load()) return sticky;
    Device* device = device_of(ordinal);
    if (device == nullptr) return CUDA_ERROR_INVALID_DEVICE;
    reset_state(*device);  // the retains stay: resetting does not release
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxGetCurrent(Context** context) {
    if (CUresult sticky = process_sticky.load()) return sticky;
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (context == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *context = current;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxSetCurrent(Context* context) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (CUresult sticky = process_sticky.load()) return sticky;
    if (context != nullptr && (context->device == nullptr || device_of(context->device->ordinal) != context->device))
        return CUDA_ERROR_INVALID_CONTEXT;
    current = context;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxSynchronize() {
    std::lock_guard<std::mutex> lock(driver_mutex);
    return synchronize();
}

EXPORT CUresult cuStreamSynchronize(CUstream stream) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    if (!valid_stream(stream)) return CUDA_ERROR_INVALID_HANDLE;
    return synchronize();
}

// ---- events: kernels run at their launch here, so an event is the host's clock when recorded ----

struct Event {
    bool timing;
    bool recorded = false;
    std::chrono::steady_clock::time_point at{};
};

constexpr unsigned CU_EVENT_DISABLE_TIMING = 0x2;

EXPORT CUresult cuEventCreate(void** event, unsigned flags) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    Device* device;
    if (CUresult error = current_device(&device)) return error;
    if (event == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *event = new Event{(flags & CU_EVENT_DISABLE_TIMING) == 0};
    ++live_events;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventRecord(void* event, CUstream stream) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    Device* device;
    if (CUresult error = current_device(&device)) return error;
    if (event == nullptr || !valid_stream(stream)) return CUDA_ERROR_INVALID_HANDLE;
    auto* recorded = static_cast<Event*>(event);
    recorded->recorded = true;
    recorded->at = std::chrono::steady_clock::now();
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventSynchronize(void* event) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    if (event == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    return synchronize();
}

// As the driver documents: both events recorded and made without CU_EVENT_DISABLE_TIMING, or
// CUDA_ERROR_INVALID_HANDLE.
EXPORT CUresult cuEventElapsedTime_v2(float* milliseconds, void* start, void* end) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    if (CUresult sticky = process_sticky.load()) return sticky;
    auto* from = static_cast<Event*>(start);
    auto* to = static_cast<Event*>(end);
    if (milliseconds == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (from == nullptr || to == nullptr || !from->timing || !to->timing || !from->recorded || !to->recorded)
        return CUDA_ERROR_INVALID_HANDLE;
    *milliseconds = config().elapsed_set ? config().elapsed
                                         : std::chrono::duration<float, std::milli>(to->at - from->at).count();
    ++timed_intervals;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventDestroy_v2(void* event) {
    if (CUresult sticky = process_sticky.load()) return sticky;
    if (event == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    delete static_cast<Event*>(event);
    --live_events;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemGetInfo_v2(std::size_t* free, std::size_t* total) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    Device* device;
    if (CUresult error = current_device(&device)) return error;
    if (free == nullptr || total == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *free = free_bytes(*device);
    *total = config().memory;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* pointer, std::size_t bytes) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    return allocate(pointer, bytes, false);
}

EXPORT CUresult cuMemAllocAsync(CUdeviceptr* pointer, std::size_t bytes, CUstream stream) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    if (!config().pools) return CUDA_ERROR_NOT_SUPPORTED;
    if (!valid_stream(stream)) return CUDA_ERROR_INVALID_HANDLE;
    return allocate(pointer, bytes, true);
}

EXPORT CUresult cuMemFree_v2(CUdeviceptr pointer) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    return release(pointer);
}

EXPORT CUresult cuMemFreeAsync(CUdeviceptr pointer, CUstream stream) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    if (!valid_stream(stream)) return CUDA_ERROR_INVALID_HANDLE;
    return release(pointer);
}

EXPORT CUresult cuMemsetD8Async(CUdeviceptr pointer, unsigned char value, std::size_t bytes, CUstream stream) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    Device* device;
    if (CUresult error = current_device(&device)) return error;
    if (!valid_stream(stream)) return CUDA_ERROR_INVALID_HANDLE;
    if (device->pending_oom) return CUDA_SUCCESS;
    if (find_range(*device, pointer, bytes) == nullptr) return CUDA_ERROR_INVALID_VALUE;
    std::memset(reinterpret_cast<void*>(pointer), value, bytes);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr destination, const void* source, std::size_t bytes, CUstream stream) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    Device* device;
    if (CUresult error = current_device(&device)) return error;
    if (!valid_stream(stream)) return CUDA_ERROR_INVALID_HANDLE;
    if (device->pending_oom) return CUDA_SUCCESS;
    if (source == nullptr || find_range(*device, destination, bytes) == nullptr) return CUDA_ERROR_INVALID_VALUE;
    std::memcpy(reinterpret_cast<void*>(destination), source, bytes);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemcpyDtoHAsync_v2(void* destination, CUdeviceptr source, std::size_t bytes, CUstream stream) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    Device* device;
    if (CUresult error = current_device(&device)) return error;
    if (!valid_stream(stream)) return CUDA_ERROR_INVALID_HANDLE;
    if (device->pending_oom) return CUDA_SUCCESS;
    if (destination == nullptr || find_range(*device, source, bytes) == nullptr) return CUDA_ERROR_INVALID_VALUE;
    std::memcpy(destination, reinterpret_cast<const void*>(source), bytes);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetDefaultMemPool(CUmemoryPool* pool, CUdevice ordinal) {
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    Device* device = device_of(ordinal);
    if (device == nullptr) return CUDA_ERROR_INVALID_DEVICE;
    if (!config().pools) return CUDA_ERROR_NOT_SUPPORTED;
    if (pool == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *pool = device;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemPoolTrimTo(CUmemoryPool pool, std::size_t keep) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    if (CUresult sticky = process_sticky.load()) return sticky;
    Device* device = static_cast<Device*>(pool);
    if (device == nullptr || device_of(device->ordinal) != device) return CUDA_ERROR_INVALID_VALUE;
    const std::uint64_t kept = std::min<std::uint64_t>(config().trim_keeps, device->pool_reserved);
    const std::uint64_t floor = std::max<std::uint64_t>({device->pool_used.load(), std::uint64_t{keep}, kept});
    if (device->pool_reserved > floor) device->pool_reserved = floor;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemPoolGetAttribute(CUmemoryPool pool, int attribute, void* value) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    if (CUresult sticky = process_sticky.load()) return sticky;
    Device* device = static_cast<Device*>(pool);
    if (device == nullptr || device_of(device->ordinal) != device || value == nullptr) return CUDA_ERROR_INVALID_VALUE;
    std::uint64_t result;
    switch (attribute) {
        case RELEASE_THRESHOLD: result = 0; break;
        case RESERVED_MEM_CURRENT: result = device->pool_reserved; break;
        case RESERVED_MEM_HIGH: result = device->pool_reserved_high; break;
        case USED_MEM_CURRENT: result = device->pool_used; break;
        case USED_MEM_HIGH: result = device->pool_used_high; break;
        default: return CUDA_ERROR_INVALID_VALUE;
    }
    std::memcpy(value, &result, sizeof result);
    return CUDA_SUCCESS;
}

// Only the high watermarks can be set, and only to zero, which resets them to the current value.
EXPORT CUresult cuMemPoolSetAttribute(CUmemoryPool pool, int attribute, void* value) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    if (CUresult sticky = process_sticky.load()) return sticky;
    Device* device = static_cast<Device*>(pool);
    if (device == nullptr || device_of(device->ordinal) != device || value == nullptr) return CUDA_ERROR_INVALID_VALUE;
    std::uint64_t requested;
    std::memcpy(&requested, value, sizeof requested);
    if (requested != 0) return CUDA_ERROR_INVALID_VALUE;
    switch (attribute) {
        case RESERVED_MEM_HIGH: device->pool_reserved_high = device->pool_reserved; break;
        case USED_MEM_HIGH: device->pool_used_high = device->pool_used; break;
        default: return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuModuleLoadData(Module** module, const void* image) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    Device* device;
    if (CUresult error = current_device(&device)) return error;
    if (module == nullptr || image == nullptr) return CUDA_ERROR_INVALID_VALUE;
    auto loaded = std::make_unique<Module>(Module{device->ordinal, device->generation, {}});
    if (std::memcmp(image, "\x7f" "ELF", 4) == 0) {
        // A CUBIN: the kernels are its global function symbols.
        if (config().refuse_cubin) return CUDA_ERROR_NO_BINARY_FOR_GPU;
        if (!cubin_entries(static_cast<const unsigned char*>(image), loaded->entries)) return CUDA_ERROR_INVALID_IMAGE;
    } else {
        const std::string ptx(static_cast<const char*>(image));
        if (ptx.find(".version") == std::string::npos || ptx.find(".target") == std::string::npos)
            return CUDA_ERROR_INVALID_IMAGE;
        for (std::size_t at = ptx.find(".entry"); at != std::string::npos; at = ptx.find(".entry", at + 6)) {
            std::size_t begin = ptx.find_first_not_of(" \t", at + 6);
            std::size_t end = ptx.find_first_of("( \t\n", begin);
            loaded->entries.insert(ptx.substr(begin, end - begin));
        }
    }
    *module = loaded.release();
    modules().insert(*module);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuModuleUnload(Module* module) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    if (CUresult sticky = process_sticky.load()) return sticky;
    if (modules().erase(module) == 0) return CUDA_ERROR_INVALID_HANDLE;
    for (auto it = functions().begin(); it != functions().end();) {
        if ((*it)->module == module) {
            delete *it;
            it = functions().erase(it);
        } else {
            ++it;
        }
    }
    delete module;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuModuleGetFunction(Function** function, Module* module, const char* name) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    if (CUresult sticky = process_sticky.load()) return sticky;
    if (function == nullptr || name == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (modules().count(module) == 0) return CUDA_ERROR_INVALID_HANDLE;
    if (module->entries.count(name) == 0) return CUDA_ERROR_NOT_FOUND;
    const emulation::Kernel* kernel = emulation::find_kernel(name);
    if (kernel == nullptr) {
        std::fprintf(stderr, "CUDA stand-in: the PTX has kernel `%s`, which the emulation does not know\n", name);
        return CUDA_ERROR_NOT_FOUND;
    }
    *function = new Function{module, kernel};
    functions().insert(*function);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuLaunchKernel(Function* function, unsigned grid_x, unsigned grid_y, unsigned grid_z, unsigned block_x,
                               unsigned block_y, unsigned block_z, unsigned shared_bytes, CUstream stream,
                               void** params, void** extra) {
    std::lock_guard<std::mutex> lock(driver_mutex);
    Device* device;
    if (CUresult error = current_device(&device)) return error;
    if (functions().count(function) == 0) return CUDA_ERROR_INVALID_HANDLE;
    if (function->module->device != device->ordinal || function->module->generation != device->generation)
        return CUDA_ERROR_INVALID_HANDLE;  // loaded into a context that has since been reset
    if (!valid_stream(stream)) return CUDA_ERROR_INVALID_HANDLE;
    if (extra != nullptr) return CUDA_ERROR_NOT_SUPPORTED;
    if (params == nullptr && function->kernel->parameters > 0) return CUDA_ERROR_INVALID_VALUE;
    const std::uint64_t threads = static_cast<std::uint64_t>(block_x) * block_y * block_z;
    if (grid_x == 0 || grid_y == 0 || grid_z == 0 || grid_x > kMaxGridX || grid_y > kMaxGridYZ ||
        grid_z > kMaxGridYZ || block_x == 0 || block_y == 0 || block_z == 0 || block_x > 1024 ||
        block_y > 1024 || block_z > 64 || threads > kMaxThreadsPerBlock || shared_bytes > kSharedMemoryPerBlock) {
        std::fprintf(stderr, "CUDA stand-in: launch of `%s` with grid (%u, %u, %u), block (%u, %u, %u) and %u "
                     "bytes of shared memory is past the device's limits\n",
                     function->kernel->name, grid_x, grid_y, grid_z, block_x, block_y, block_z, shared_bytes);
        return CUDA_ERROR_INVALID_VALUE;
    }
    const std::uint64_t number = ++launches;
    if (number == config().foreign_launch) foreign_taken = config().foreign_bytes;
    Config injected = config();
    if (!injected.fail_file.empty()) {
        if (FILE* file = std::fopen(injected.fail_file.c_str(), "r")) {
            char line[64] = {0};
            const bool read = std::fgets(line, sizeof line, file) != nullptr;
            std::fclose(file);
            const std::string text = read ? line : "";
            parse_failure(text, injected);
            if (number == injected.fail_launch && text.find(":repeat") == std::string::npos)
                std::remove(injected.fail_file.c_str());
        }
    }
    if (number == injected.fail_launch) {
        switch (injected.failure) {
            case Config::Failure::PrintHang:
                std::printf("CUDA stand-in: a line on standard output that is no event\n");
                std::fflush(stdout);
                for (;;) pause();
            case Config::Failure::Hang:
                for (;;) pause();  // a kernel that never ends: only killing the process ends it
            case Config::Failure::Crash:
                std::fprintf(stderr, "CUDA stand-in: aborting the process at launch %llu, as injected\n",
                             static_cast<unsigned long long>(number));
                std::abort();
            case Config::Failure::Fault:
                break;
        }
        // Asynchronous, as on hardware: later calls report it, for the rest of the process.
        device->sticky = injected.fail_with;
        process_sticky = injected.fail_with;
        return CUDA_SUCCESS;
    }
    if (device->pending_oom) return CUDA_SUCCESS;
    LaunchCheck check{device, function->kernel->name};
    running_kernel = function->kernel->name;
    const int refused = function->kernel->launch(
        emulation::Grid{dim3{grid_x, grid_y, grid_z}, dim3{block_x, block_y, block_z}}, params, &pointer_is_live, &check);
    running_kernel = nullptr;
    if (refused >= 0) {
        device->sticky = CUDA_ERROR_ILLEGAL_ADDRESS;
        process_sticky = CUDA_ERROR_ILLEGAL_ADDRESS;
    }
    return CUDA_SUCCESS;
}

// ---- what the NVML stand-in reads ----------------------------------------------------------

EXPORT int headroom_standin_device_count() { return config().devices; }

EXPORT void headroom_standin_nvml_delay() {
    if (config().nvml_delay_file.empty()) return;
    if (FILE* file = std::fopen(config().nvml_delay_file.c_str(), "r")) {
        unsigned long milliseconds = 0;
        const bool read = std::fscanf(file, "%lu", &milliseconds) == 1;
        std::fclose(file);
        if (read) usleep(static_cast<useconds_t>(milliseconds) * 1000);
    }
}

EXPORT void headroom_standin_memory(int ordinal, std::uint64_t* total, std::uint64_t* used) {
    Device* device = device_of(ordinal);
    *total = config().memory;
    *used = device == nullptr ? 0 : std::min(config().memory, foreign_bytes(*device) + held_bytes(*device));
}

EXPORT int headroom_standin_processes(int ordinal, unsigned* pids, std::uint64_t* bytes, int capacity) {
    Device* device = device_of(ordinal);
    if (device == nullptr) return 0;
    std::vector<ForeignProcess> list;
    if (device->retains > 0) list.push_back(ForeignProcess{static_cast<unsigned>(getpid()), held_bytes(*device)});
    for (unsigned pid : other_context_processes(ordinal)) list.push_back(ForeignProcess{pid, 0});
    if (ordinal == 0) {
        for (const ForeignProcess& p : config().processes) list.push_back(p);
        if (foreign_taken.load() > 0) list.push_back(ForeignProcess{90001, foreign_taken.load()});
    }
    for (int i = 0; i < capacity && i < static_cast<int>(list.size()); ++i) {
        pids[i] = list[i].pid;
        bytes[i] = list[i].bytes;
    }
    return static_cast<int>(list.size());
}

EXPORT const char* headroom_standin_name(int) { return "CPU stand-in for an NVIDIA GPU (tests only)"; }

EXPORT void headroom_standin_uuid(int ordinal, char* out, unsigned length) {
    std::snprintf(out, length, "GPU-57a4d100-0000-4000-8000-0000000000%02x", ordinal & 0xff);
}

EXPORT unsigned headroom_standin_utilization() { return config().utilization; }

EXPORT unsigned headroom_standin_temperature() { return config().temperature; }
