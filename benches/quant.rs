//! Codec throughput on real weight shapes, next to a plain memory copy of the same bytes.
//!
//! `cargo bench --bench quant`. Every figure is GB/s of bf16 weight bytes (2 per element):
//! read by quantize, written by dequantize, copied by memcpy.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use qlorad::quant::{dequantize_4bit, quantize_4bit, FloatSlice, NestedAbsmax, QuantType};

fn weights(n: usize) -> Vec<bf16> {
    // A cheap deterministic pseudo-normal fill; the codec's speed does not depend on the values.
    let mut s = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            bf16::from_f32((u - 0.5) * 0.08)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    for (rows, cols) in [(4096usize, 4096usize), (4096, 14336)] {
        let n = rows * cols;
        let w = weights(n);
        let mut group = c.benchmark_group(format!("bf16_{rows}x{cols}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(4));
        group.throughput(Throughput::Bytes((n * 2) as u64));

        let mut dst = vec![bf16::ZERO; n];
        group.bench_function("memcpy", |b| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&w));
                black_box(&dst);
            })
        });

        for (qt, dq) in [
            (QuantType::Nf4, true),
            (QuantType::Nf4, false),
            (QuantType::Fp4, true),
        ] {
            let id = format!("{qt}_{}", if dq { "dq" } else { "plain" });
            group.bench_with_input(BenchmarkId::new("quantize", &id), &w, |b, w| {
                b.iter(|| {
                    let (packed, absmax) = quantize_4bit(FloatSlice::BF16(w), qt, 64).unwrap();
                    let nested = dq.then(|| NestedAbsmax::compress(&absmax));
                    black_box((packed, absmax, nested))
                })
            });
            let (packed, absmax) = quantize_4bit(FloatSlice::BF16(&w), qt, 64).unwrap();
            let nested = NestedAbsmax::compress(&absmax);
            group.bench_function(BenchmarkId::new("dequantize", &id), |b| {
                b.iter(|| {
                    let absmax = if dq {
                        nested.expand().unwrap()
                    } else {
                        absmax.clone()
                    };
                    dequantize_4bit(&packed, &absmax, qt, 64, &mut dst).unwrap();
                    black_box(&dst);
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
