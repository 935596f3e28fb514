//! Wall time of a full `tune` of every example on the host device at its default budget
//! (256 MiB). One run each: a tune takes seconds, too long for statistical repetition.
//! Run: `cargo bench --bench tune`. Goal: the CIFAR example in under 10 s on a 2-core host.

use std::ops::ControlFlow;
use std::time::Instant;

use headroom_devices::host::HostDevice;
use headroom_engine::{tune, Job};

#[path = "common/examples.rs"]
mod examples;

fn main() {
    for (name, spec) in examples::selected() {
        let job = Job::from_value(spec).unwrap();
        let started = Instant::now();
        let result = tune(&job, &mut HostDevice::default(), &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
        println!(
            "tune {name:<18} {:>7.2} s  max {:>7}  recommended {:>7}  {} probes",
            started.elapsed().as_secs_f64(),
            result.max_batch_size,
            result.recommended_batch_size,
            result.probes.len()
        );
    }
}
