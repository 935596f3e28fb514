//! Host training-step throughput for the CIFAR MLP (3072-128-10, Adam) at batch 256 and 4096.
//! Run: `cargo bench --bench host`. Criterion reports time per step; throughput is in samples.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use headroom_devices::host::HostDevice;
use headroom_engine::step::Executor;
use headroom_engine::{Job, Plan};

fn cifar_plan() -> Plan {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/cifar10-mlp-adam.json"
    ))
    .unwrap();
    Job::from_json(&text).unwrap().plan().clone()
}

fn step_throughput(c: &mut Criterion) {
    let plan = cifar_plan();
    let mut group = c.benchmark_group("host training step, CIFAR MLP");
    group.sample_size(10);
    for batch in [256u64, 4096] {
        let mut device = HostDevice::new(1 << 30);
        let program = plan.program(batch, 1).unwrap();
        let mut executor = Executor::setup(&mut device, &program).unwrap();
        let mut step = 0;
        group.throughput(Throughput::Elements(batch));
        group.bench_function(BenchmarkId::from_parameter(batch), |b| {
            b.iter(|| {
                step += 1;
                executor.step(&mut device, &plan, &program, step).unwrap();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, step_throughput);
criterion_main!(benches);
