//! Host training-step throughput for the CIFAR MLP (3072-128-10, Adam) at batch 256 and 4096,
//! and the host's three convolution passes on the layers of the image examples (batch 64).
//! Run: `cargo bench --bench host`. Criterion reports time per step or pass; throughput is in
//! samples.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use headroom_devices::host::{conv, HostDevice};
use headroom_engine::modules::conv2d::Convolution;
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

/// A convolution of `channels x side x side` inputs into `filters`, kernel 3, padding 1.
fn conv3x3(channels: u64, side: u64, filters: u64, stride: u64) -> Convolution {
    Convolution {
        in_channels: channels,
        height: side,
        width: side,
        out_channels: filters,
        kernel: 3,
        stride,
        padding: 1,
        dilation: 1,
        groups: 1,
    }
}

fn convolution_passes(c: &mut Criterion) {
    const BATCH: usize = 64;
    let layers = [
        ("cnn-bn conv1 3x32x32->32", conv3x3(3, 32, 32, 1)),
        ("cnn-bn conv3 64x8x8->128", conv3x3(64, 8, 128, 1)),
        ("resnet18 layer1 64x32x32->64", conv3x3(64, 32, 64, 1)),
        ("resnet18 layer4 512x4x4->512", conv3x3(512, 4, 512, 1)),
    ];
    let mut group = c.benchmark_group("host convolution, batch 64");
    group.sample_size(10);
    group.throughput(Throughput::Elements(BATCH as u64));
    for (name, conv) in layers {
        let values = |n: u64| vec![0.5f32; BATCH * n as usize];
        let (x, dy, w) = (
            values(conv.inputs()),
            values(conv.outputs()),
            vec![0.1f32; conv.weights() as usize],
        );
        let (mut y, mut dx, mut dw) = (values(conv.outputs()), values(conv.inputs()), w.clone());
        group.bench_function(BenchmarkId::new("forward", name), |b| {
            b.iter(|| conv::conv2d_forward(&x, &w, &mut y, &conv))
        });
        group.bench_function(BenchmarkId::new("input gradient", name), |b| {
            b.iter(|| conv::conv2d_input_gradient(&dy, &w, &mut dx, &conv))
        });
        group.bench_function(BenchmarkId::new("weight gradient", name), |b| {
            b.iter(|| conv::add_conv2d_weight_gradient(&dy, &x, &mut dw, &conv))
        });
    }
    group.finish();
}

criterion_group!(benches, step_throughput, convolution_passes);
criterion_main!(benches);
