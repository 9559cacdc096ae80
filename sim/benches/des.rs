//! Simulator speed: events per second replaying the decode graph of llama-2-13b on a
//! 6 GB laptop RTX 3060 with the shipped zigzag-block plan (every step simulated).
//!
//! Run: cargo bench -p ferry-sim --bench des

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry_core::catalog::Catalog;
use ferry_core::plan::Plan;
use ferry_core::resolve::resolve_plan;
use ferry_core::schedule::{lower, Steps};
use ferry_sim::cost::CostModel;
use ferry_sim::simulate;

fn bench_des(c: &mut Criterion) {
    let catalog = Catalog::builtin().unwrap();
    for name in ["rtx3060-laptop-13b-zigzag", "rtx3060-13b-layer-prefetch"] {
        let text = &catalog.plans.iter().find(|(f, _)| *f == format!("{name}.yaml")).unwrap().1;
        let plan: Plan = ferry_core::yaml::from_yaml_str(text, name).unwrap();
        let resolved = resolve_plan(&catalog, plan, std::path::Path::new(".")).unwrap();
        let graph =
            lower(&resolved.plan.policy, &resolved.model, &resolved.plan.workload, &resolved.profile, &Steps::All)
                .unwrap();
        let cost = CostModel::new(&resolved.profile, &resolved.model);
        let events = simulate(&graph, &cost).unwrap().events;
        let mut group = c.benchmark_group("des");
        group.throughput(Throughput::Elements(events));
        group.sample_size(20);
        group.bench_function(format!("{name} ({} tasks, {events} events)", graph.tasks.len()), |b| {
            b.iter(|| simulate(&graph, &cost).unwrap())
        });
        group.finish();
    }
}

criterion_group!(benches, bench_des);
criterion_main!(benches);
