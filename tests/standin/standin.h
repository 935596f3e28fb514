// What the NVML stand-in reads from the driver stand-in (libcuda.so.1 exports these for
// libnvidia-ml.so.1, which links against it): one view of the same CPU-backed devices.
#pragma once

#include <cstdint>

extern "C" {
// Devices the stand-in presents (HEADROOM_STANDIN_DEVICES, default 1).
int headroom_standin_device_count();
// Total bytes, and bytes in use by every process (this one's reservations and the foreign ones).
void headroom_standin_memory(int device, std::uint64_t* total, std::uint64_t* used);
// Processes with a compute context on `device`: this process while it holds a context, and the
// foreign ones set by HEADROOM_STANDIN_PROCESSES or HEADROOM_STANDIN_FOREIGN_ALLOC. Writes up to
// `capacity` entries and returns how many there are.
int headroom_standin_processes(int device, unsigned* pids, std::uint64_t* bytes, int capacity);
// The device's marketing name and NVML-style UUID ("GPU-...").
const char* headroom_standin_name(int device);
void headroom_standin_uuid(int device, char* out, unsigned length);
// Utilisation percent and temperature, from HEADROOM_STANDIN_UTILIZATION / _TEMPERATURE.
unsigned headroom_standin_utilization();
unsigned headroom_standin_temperature();
// Sleeps as long as HEADROOM_STANDIN_NVML_DELAY_FILE says, while that file exists.
void headroom_standin_nvml_delay();
}
