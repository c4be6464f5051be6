//! Criterion benchmarks of the hot paths: fold-in, single-user top-k against a streaming
//! sum over the same matrix, batched top-k, and one ALS iteration.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use troupe_models::als::{self, AlsParams, FoldIn};
use troupe_models::kernels;
use troupe_models::sparse::Csr;
use troupe_models::topk;

fn random_matrix(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Array2::from_shape_simple_fn((rows, cols), || rng.random::<f32>() - 0.5)
}

fn fold_in(c: &mut Criterion) {
    let items = random_matrix(20_000, 64, 1);
    let params = AlsParams::default();
    let f = FoldIn::new(items.view(), &params);
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut g = c.benchmark_group("fold_in");
    for n in [10usize, 100, 1000] {
        let inter: Vec<(u32, f32)> = (0..n).map(|_| (rng.random_range(0..20_000), 1.0)).collect();
        g.bench_with_input(BenchmarkId::new("k64", n), &inter, |b, inter| {
            b.iter(|| black_box(f.solve(items.view(), inter)))
        });
    }
    g.finish();
}

fn top_k(c: &mut Criterion) {
    let mut g = c.benchmark_group("top_k_single");
    for n in [10_000usize, 100_000] {
        let items = random_matrix(n, 64, 3);
        let q: Vec<f32> = items.row(7).to_vec();
        let flat = items.as_slice().unwrap();
        g.throughput(Throughput::Bytes((n * 64 * 4) as u64));
        let mut scratch = Vec::new();
        g.bench_with_input(BenchmarkId::new("topk10", n), &n, |b, _| {
            b.iter(|| {
                black_box(topk::top_k_dense(
                    items.view(),
                    &q,
                    10,
                    |i| i == 7,
                    &mut scratch,
                ))
            })
        });
        g.bench_with_input(BenchmarkId::new("streaming_sum", n), &n, |b, _| {
            b.iter(|| black_box(kernels::sum(flat)))
        });
    }
    g.finish();

    let items = random_matrix(100_000, 64, 4);
    let users = random_matrix(256, 64, 5);
    let mut g = c.benchmark_group("top_k_batch");
    g.throughput(Throughput::Elements(256));
    g.sample_size(10);
    g.bench_function("256_users_100k_items", |b| {
        b.iter(|| {
            black_box(topk::top_k_batch(items.view(), users.view(), 10, |_, _| {
                false
            }))
        })
    });
    g.finish();
}

fn als_iteration(c: &mut Criterion) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let (users, items) = (20_000usize, 5_000usize);
    let triples: Vec<(u32, u32, f32)> = (0..400_000)
        .map(|_| {
            (
                rng.random_range(0..users as u32),
                rng.random_range(0..items as u32),
                1.0,
            )
        })
        .collect();
    let m = Csr::from_triples(users, items, &triples);
    let params = AlsParams {
        iterations: 1,
        ..Default::default()
    };
    let mut g = c.benchmark_group("als");
    g.sample_size(10);
    g.bench_function("one_iteration_20k_x_5k_400k", |b| {
        b.iter(|| black_box(als::fit(&m, &params, false, |_, _| {}).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, fold_in, top_k, als_iteration);
criterion_main!(benches);
