//! The kernel checks, written once and run against every device present: the host always, and
//! each CUDA device when the driver, NVRTC and a GPU are there (on the CUDA stand-in, the same
//! checks run in tests/standin.rs).

mod support;

use headroom_devices::cuda::{self, CudaDevice};
use headroom_devices::host::HostDevice;
use headroom_devices::parity::{check_kernels, check_training};
use support::assert_all_pass;

#[test]
fn every_kernel_matches_the_reference_on_every_device() {
    assert_all_pass("host", &check_kernels(&mut HostDevice::default()).unwrap());
    let count = if cuda::driver_available() && cuda::compile::nvrtc_available() {
        cuda::device_count().unwrap_or(0)
    } else {
        0
    };
    if count == 0 {
        eprintln!("no CUDA device: the kernel checks ran on the host device alone");
    }
    for index in 0..count {
        let mut device = CudaDevice::open(index).unwrap();
        let name = format!("cuda:{index}");
        assert_all_pass(&name, &check_kernels(&mut device).unwrap());
        assert_all_pass(&name, &check_training(&mut device).unwrap());
    }
}
