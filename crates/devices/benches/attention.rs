//! The host's fused attention, forward and backward, at GPT-2 small's heads (12 of 64, causal)
//! over 4 sequences of 256 and of 1,024 positions, in f32: the figure to set beside PyTorch CPU's
//! `scaled_dot_product_attention` on the same shapes (`scripts/sdpa-cpu-bench.py`).
//! Run: `cargo bench --bench attention`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use headroom_devices::host::HostDevice;
use headroom_devices::transfer::Transfer;
use headroom_engine::plan::Storage;
use headroom_engine::program::geometry::Attention;
use headroom_engine::program::{AttentionGradients, AttentionSaved};
use headroom_engine::step::Attend;
use headroom_engine::synthetic;

fn values(len: u64, seed: u64) -> Vec<f32> {
    let key = synthetic::stream_key(seed, 1);
    (0..len).map(|i| synthetic::uniform(key, i, 1.0)).collect()
}

fn forward_and_backward(c: &mut Criterion) {
    let mut group = c.benchmark_group("host attention forward+backward, 4 x 12 heads x 64, causal");
    group.sample_size(10);
    for sequence in [256u64, 1024] {
        let shape = Attention {
            batch: 4,
            sequence,
            heads: 12,
            kv_heads: 12,
            head_dim: 64,
            causal: true,
            dropout: None,
        };
        let n = shape.query_values();
        let mut device = HostDevice::new(1 << 30);
        let write = |device: &mut HostDevice, seed| {
            device.write_values(&values(n, seed), Storage::F32).unwrap()
        };
        let [q, k, v, dout] = [1, 2, 3, 4].map(|seed| write(&mut device, seed));
        let mut o = write(&mut device, 5);
        let mut lse = device
            .write_values(&vec![0.0; shape.rows() as usize], Storage::F32)
            .unwrap();
        let [mut dq, mut dk, mut dv] = [6, 7, 8].map(|seed| write(&mut device, seed));
        group.throughput(Throughput::Elements(shape.batch * sequence));
        group.bench_function(BenchmarkId::from_parameter(sequence), |b| {
            b.iter(|| {
                device
                    .attention_forward(&q, &k, &v, &mut o, &mut lse, &shape)
                    .unwrap();
                let saved = AttentionSaved {
                    q: &q,
                    k: &k,
                    v: &v,
                    o: &o,
                    lse: &lse,
                };
                let grads = AttentionGradients {
                    dq: &mut dq,
                    dk: &mut dk,
                    dv: &mut dv,
                };
                device
                    .attention_backward(saved, &dout, grads, &shape)
                    .unwrap();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, forward_and_backward);
criterion_main!(benches);
