//! Lowering marks the compute tasks whose weights are not kept on their device
//! (`Payload::Compute::weights_off_device`): the cpu engine multiplies those in the
//! file's row order, which the cost model prices at that order's rates.

use ferry_core::catalog::Catalog;
use ferry_core::graph::{Op, Payload, Place, Resource, TaskGraph};
use ferry_core::hardware::Hardware;
use ferry_core::model::Dtype;
use ferry_core::plan::{Policy, Tier, TierCounts, Workload};
use ferry_core::profile::Profile;
use ferry_core::schedule::{lower, Steps};

fn lowered(edit: impl FnOnce(&mut Policy, u64)) -> (Policy, TaskGraph) {
    let catalog = Catalog::builtin().unwrap();
    let profile = Profile::from_datasheet(&Hardware {
        gpu: catalog.gpu("rtx3060").unwrap().value,
        host: catalog.host("ferry-ci-vm").unwrap().value,
    });
    let model = catalog.model("test-tiny").unwrap().value;
    let mut policy = Policy::all_on_device(model.num_layers, 1, Dtype::F32);
    edit(&mut policy, model.num_layers);
    let workload = Workload { batch_size: 1, prompt_len: 4, gen_len: 2 };
    let graph = lower(&policy, &model, &workload, &profile, &Steps::All).unwrap();
    (policy, graph)
}

/// (op, layer, where it runs, weights off the device) of every compute task.
fn marks(graph: &TaskGraph) -> Vec<(Op, u32, Resource, bool)> {
    let compute = graph.tasks.iter().filter_map(|t| match t.payload {
        Payload::Compute { op, weights_off_device, .. } => Some((op, t.layer, t.resource, weights_off_device)),
        _ => None,
    });
    compute.collect()
}

#[test]
fn only_tasks_over_weights_outside_the_device_tier_are_marked() {
    let (_, resident) = lowered(|_, _| {});
    assert!(marks(&resident).iter().all(|&(_, _, _, off)| !off), "everything kept on the device");

    // A layer's MLP streamed from disk and one's attention from the host, the head
    // kept (and computed) on the host.
    let (policy, streamed) = lowered(|p, layers| {
        p.mlp_weights = TierCounts { device: layers - 1, host: 0, disk: 1 };
        p.attention_weights = TierCounts { device: layers - 1, host: 1, disk: 0 };
        p.head = Tier::Host;
    });
    let mut marked = Vec::new();
    for (op, layer, resource, off) in marks(&streamed) {
        let want = match op {
            Op::Mlp => policy.placement_of(layer as u64).mlp != Tier::Device,
            Op::Attention | Op::AttnQkv | Op::AttnOut => policy.placement_of(layer as u64).attention == Tier::Host,
            Op::Head => true,
            Op::Embed | Op::AttnCore | Op::Route => false,
        };
        assert_eq!(off, want, "{op:?} of layer {layer} on {resource:?}");
        if off && !marked.contains(&op) {
            marked.push(op);
        }
        if op == Op::Head {
            assert!(matches!(resource, Resource::Compute { at: Place::Host(_) }), "the head computed on the host");
        }
    }
    marked.sort_by_key(|op| op.name());
    assert_eq!(marked, [Op::Attention, Op::Head, Op::Mlp], "each kind of weights off the device seen");
}
