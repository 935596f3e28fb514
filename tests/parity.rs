//! The kernel checks, written once and run against every device present: the host always, and
//! each CUDA device when the driver, NVRTC and a GPU are there.

use headroom::device::cuda::{self, CudaDevice};
use headroom::device::host::HostDevice;
use headroom::parity::{check_kernels, check_training, Check};

fn assert_all_pass(device: &str, checks: Vec<Check>) {
    assert!(!checks.is_empty());
    let failed: Vec<_> = checks.iter().filter(|c| !c.passed).collect();
    assert!(failed.is_empty(), "{device}: {failed:#?}");
}

#[test]
fn every_kernel_matches_the_reference_on_every_device() {
    assert_all_pass("host", check_kernels(&mut HostDevice::default()).unwrap());
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
        assert_all_pass(
            &format!("cuda:{index}"),
            check_kernels(&mut device).unwrap(),
        );
        assert_all_pass(
            &format!("cuda:{index}"),
            check_training(&mut device).unwrap(),
        );
    }
}
