//! FSDP2 (`torch.distributed.fsdp.fully_shard`) as rank 0 of `world` ranks runs it, with
//! PyTorch's defaults (one reduce-scatter input kept in flight; `reshard_after_forward=True`
//! below the root unless the job says `false`).
//!
//! Each parameter lives as its shard: the first dimension cut into `world` chunks of
//! `ceil(rows / world)` rows, padded, rank 0 keeping the first. Parameters are grouped (each
//! `fully_shard` call; the root's group holds what no other took). A group is gathered before
//! its forward: the all-gather's output (every rank's shards of the group, rank-major) is made
//! and this rank's shards copied into it; the unsharded parameters (padded) are made and the
//! gathered values copied out. In forward the all-gather's output is kept until the next
//! group's all-gather has been made (PyTorch's overlap of copy-out and the next all-gather);
//! after the forward the unsharded parameters go (the root's, and every group's when the job
//! keeps them gathered, stay until its backward). In backward each group is gathered again
//! (unless kept) when its output's gradient arrives (its pre-backward hook), the all-gather's
//! output going right after the copy-out, and the group before it in forward order is
//! prefetched (its all-gather made, unless kept). When the gradient of a group's input
//! arrives (its post-backward hook; at the end of backward when its input needs none) the
//! unsharded parameters go, the previous reduce-scatter's input goes, this one's is made
//! (every gradient padded, rank-major), the unsharded gradients go, and the sharded gradients
//! are made from this rank's chunk. The optimizer updates the shards. A checkpoint is a group
//! of its own, FSDP outside it: its recomputation reads what its pre-backward gathered.
//!
//! One device runs one rank: the collectives move nothing between devices, so only this rank's
//! chunks are copied (a copy a parameter, whatever the world size); the other ranks' stay as
//! allocated (zero), and this rank's chunk of a gradient is its own.

use super::{Backward, Graph, Pass, StorageEntry, Target, Tensor};
use crate::memory::{Buffer, Element, Part};
use crate::program::instr::{Instr, Slot};

/// A parameter as FSDP holds it: its shard (the optimizer's parameter) and its unsharded
/// form (what the modules read), made and let go by the step.
#[derive(Debug, Clone, Copy)]
pub struct ShardedParameter {
    /// This rank's shard, padded: made in setup.
    pub shard: Tensor,
    /// The unsharded parameter: the shard's gradient target, its storage padded.
    pub gathered: Tensor,
    /// Values of the padded shard.
    shard_len: u64,
    /// Values of the parameter.
    elements: u64,
}

/// Rows of a rank's chunk of `rows`, and the values of the padded shard of a parameter of
/// `elements` values.
pub fn shard_len(elements: u64, rows: u64, world: u64) -> u64 {
    let per_row = elements.checked_div(rows).unwrap_or(0);
    rows.div_ceil(world).saturating_mul(per_row)
}

/// A group of parameters sharded together.
#[derive(Debug)]
struct Group {
    parameters: Vec<ShardedParameter>,
    /// The all-gather made and not yet copied out (prefetched in backward).
    pending: Option<Tensor>,
    /// Whether the unsharded parameters are held.
    unsharded: bool,
    /// Whether the forward lets them go (never the root's; the others' by default).
    reshard_after_forward: bool,
    /// Where its forwards fall in the forward order.
    post_forward_indices: Vec<usize>,
    /// Whether its post-backward ran.
    reduced: bool,
}

/// The sharding of a step being recorded.
#[derive(Debug)]
pub(super) struct Fsdp {
    world: u64,
    groups: Vec<Group>,
    /// The last forward all-gather's output, kept until the next one is made.
    deferred: Option<Tensor>,
    /// Reduce-scatter inputs in flight.
    reducing: Vec<Tensor>,
    /// Groups in the order their forwards ended.
    post_forward_order: Vec<usize>,
}

/// A group of [`Graph::shard_group`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardGroup(usize);

impl Graph {
    /// Shards every parameter made from now on over `world` ranks.
    pub fn begin_sharding(&mut self, world: u64) {
        self.fsdp = Some(Fsdp {
            world,
            groups: Vec::new(),
            deferred: None,
            reducing: Vec::new(),
            post_forward_order: Vec::new(),
        });
    }

    fn sharding(&mut self) -> &mut Fsdp {
        self.fsdp.as_mut().expect("sharding began")
    }

    /// A parameter of `elements` values, `rows` along its first dimension, `trained` or
    /// frozen, sharded: its shard made now (in setup), its unsharded storage reserved.
    pub fn sharded_parameter(
        &mut self,
        elements: u64,
        rows: u64,
        element: Element,
        trained: bool,
    ) -> ShardedParameter {
        let shard_len = shard_len(elements, rows, self.sharding().world);
        let shard = self.parameter(shard_len, element, trained);
        let slot = self.code.reserve();
        let target = self.tensors[shard.0].target;
        let storage = StorageEntry::new(slot, Part::Parameters);
        let gathered = self.entry(storage, elements, element, target);
        ShardedParameter {
            shard,
            gathered,
            shard_len,
            elements,
        }
    }

    /// `parameters` sharded together, let go after their forward when `reshard_after_forward`
    /// (else kept gathered to their backward, as the model's own `fully_shard`, made last, keeps
    /// its).
    pub fn shard_group(
        &mut self,
        parameters: Vec<ShardedParameter>,
        reshard_after_forward: bool,
    ) -> ShardGroup {
        let fsdp = self.sharding();
        fsdp.groups.push(Group {
            parameters,
            pending: None,
            unsharded: false,
            reshard_after_forward,
            post_forward_indices: Vec::new(),
            reduced: false,
        });
        ShardGroup(fsdp.groups.len() - 1)
    }

    /// `group`'s pre-forward: gathered. Returns what its layers read of `x` (a reference the
    /// caller owns): `x` itself, or (when it needs a gradient) `x` through the hook that runs
    /// the group's post-backward once `x`'s gradient has arrived.
    pub fn enter_shard_group(&mut self, group: ShardGroup, x: Tensor) -> Tensor {
        if self.sharding().groups[group.0].parameters.is_empty() {
            // `fully_shard` of a module without parameters makes no group: no hooks.
            self.retain(x);
            return x;
        }
        self.unshard(group.0);
        self.wait_for_unshard(group.0, true);
        self.hooked(Hook::PostBackward(group.0), x)
    }

    /// `group`'s post-forward: resharded (unless the root's), its place in the forward order
    /// taken. Returns `y` through the hook that gathers the group again once `y`'s gradient has
    /// arrived (a reference the caller owns; `y` stays the caller's).
    pub fn exit_shard_group(&mut self, group: ShardGroup, y: Tensor) -> Tensor {
        if self.sharding().groups[group.0].parameters.is_empty() {
            self.retain(y);
            return y;
        }
        if self.sharding().groups[group.0].reshard_after_forward {
            self.reshard(group.0);
        }
        let fsdp = self.sharding();
        let index = fsdp.post_forward_order.len();
        fsdp.post_forward_order.push(group.0);
        fsdp.groups[group.0].post_forward_indices.push(index);
        self.hooked(Hook::PreBackward(group.0), y)
    }

    /// The root's pre-backward hook where the root's output holds the loss (a Hugging Face
    /// model): it runs on the loss's gradient, as backward begins, before the loss's own
    /// backward (the hook on the logits then finds it done).
    pub fn pre_backward_at_loss(&mut self, root: ShardGroup) {
        if !self.sharding().groups[root.0].parameters.is_empty() {
            self.pre_backward(root.0);
        }
    }

    /// The model's forward is over: the last all-gather's output goes.
    pub fn end_sharded_forward(&mut self) {
        let deferred = self.sharding().deferred.take();
        self.release_optional(deferred);
    }

    /// Backward is over (its final callback): every group whose post-backward did not run (its
    /// input needed no gradient) reduces now, the root's (the last made) first, then the
    /// others in the model's order; then the reduce-scatter inputs in flight go.
    pub fn end_sharded_backward(&mut self) {
        let groups = self.sharding().groups.len();
        let root_first = groups
            .checked_sub(1)
            .into_iter()
            .chain(0..groups.saturating_sub(1));
        for group in root_first.clone() {
            self.post_backward(group);
        }
        // An all-gather prefetched for a group whose backward never ran (its output needed no
        // gradient) goes unused.
        for group in root_first {
            let pending = self.sharding().groups[group].pending.take();
            self.release_optional(pending);
        }
        let fsdp = self.sharding();
        let (deferred, reducing) = (fsdp.deferred.take(), std::mem::take(&mut fsdp.reducing));
        self.release_optional(deferred);
        for input in reducing {
            self.release(input);
        }
    }

    /// `x` itself when it needs no gradient, else an alias of it whose gradient runs `hook`
    /// first. A reference the caller owns.
    fn hooked(&mut self, hook: Hook, x: Tensor) -> Tensor {
        if !self.requires_grad(x) {
            self.retain(x);
            return x;
        }
        let alias = self.alias(x);
        self.record(hook, &[x], &[], &[alias]);
        alias
    }

    /// The group's all-gather made and this rank's shards copied in, unless gathered or made.
    fn unshard(&mut self, group: usize) {
        let g = &self.sharding().groups[group];
        if g.unsharded || g.pending.is_some() {
            return;
        }
        let parameters = g.parameters.clone();
        let Some(first) = parameters.first() else {
            return;
        };
        let element = self.tensors[first.shard.0].element;
        let per_rank = parameters.iter().map(|p| p.shard_len).sum::<u64>();
        let world = self.sharding().world;
        let output = self.allocate(Part::Parameters, per_rank.saturating_mul(world), element);
        let mut offset = 0;
        for p in &parameters {
            self.copy(p.shard, 0, output, offset, p.shard_len);
            offset += p.shard_len;
        }
        self.sharding().groups[group].pending = Some(output);
    }

    /// The made all-gather copied out into the unsharded parameters. In forward the previous
    /// all-gather's output goes first and this one's is kept; in backward this one's goes.
    fn wait_for_unshard(&mut self, group: usize, forward: bool) {
        let Some(output) = self.sharding().groups[group].pending.take() else {
            return;
        };
        if forward {
            let deferred = self.sharding().deferred.take();
            self.release_optional(deferred);
        }
        let parameters = self.sharding().groups[group].parameters.clone();
        let world = self.sharding().world;
        for p in &parameters {
            let buffer = Buffer {
                part: Part::Parameters,
                elements: p.shard_len.saturating_mul(world),
                element: self.tensors[p.gathered.0].element,
            };
            let slot = self.slot(p.gathered);
            self.code.alloc_into(slot, buffer);
        }
        // Rank 0's chunks: the others' are zero in the output and in the made parameters.
        let mut offset = 0;
        for p in &parameters {
            self.copy(output, offset, p.gathered, 0, p.shard_len);
            offset += p.shard_len;
        }
        match forward {
            true => self.sharding().deferred = Some(output),
            false => self.release(output),
        }
        self.sharding().groups[group].unsharded = true;
    }

    /// The unsharded parameters let go.
    fn reshard(&mut self, group: usize) {
        let g = &mut self.sharding().groups[group];
        if !std::mem::replace(&mut g.unsharded, false) {
            return;
        }
        let slots: Vec<Slot> = g
            .parameters
            .clone()
            .iter()
            .map(|p| self.slot(p.gathered))
            .collect();
        for slot in slots {
            self.code.free(slot);
        }
    }

    /// The pre-backward hook: gathered again (unless prefetched), then the group before it in
    /// forward order prefetched.
    fn pre_backward(&mut self, group: usize) {
        self.unshard(group);
        self.wait_for_unshard(group, false);
        let fsdp = self.sharding();
        let Some(index) = fsdp.groups[group].post_forward_indices.pop() else {
            return;
        };
        if let Some(&before) = index
            .checked_sub(1)
            .and_then(|i| fsdp.post_forward_order.get(i))
        {
            self.unshard(before);
        }
    }

    /// The post-backward hook: the unsharded parameters go, the previous reduce-scatter's input
    /// goes, and the unsharded gradients become sharded ones through this one's.
    fn post_backward(&mut self, group: usize) {
        let g = &mut self.sharding().groups[group];
        if std::mem::replace(&mut g.reduced, true) {
            return;
        }
        let parameters = g.parameters.clone();
        let mut reduced = Vec::new();
        for p in parameters {
            let Target::Parameter(index) = self.tensors[p.shard.0].target else {
                continue;
            };
            if let Some(grad) = self.trained[index].1.take() {
                reduced.push((p, index, grad));
            }
        }
        self.reshard(group);
        let previous = std::mem::take(&mut self.sharding().reducing);
        for input in previous {
            self.release(input);
        }
        let Some(&(_, _, first)) = reduced.first() else {
            return;
        };
        let element = self.tensors[first.0].element;
        let world = self.sharding().world;
        let per_rank: u64 = reduced.iter().map(|(p, _, _)| p.shard_len).sum();
        let input = self.allocate(Part::Gradients, per_rank.saturating_mul(world), element);
        // Rank 0's chunk of each gradient, the one its reduce-scatter output takes; the other
        // ranks' are summed into theirs, which this rank never reads.
        let mut offset = 0;
        for &(p, _, grad) in &reduced {
            self.copy(grad, 0, input, offset, p.shard_len.min(p.elements));
            offset += p.shard_len;
        }
        for &(_, _, grad) in &reduced {
            self.release(grad);
        }
        let mut offset = 0;
        for &(p, index, _) in &reduced {
            let sharded = self.allocate(Part::Gradients, p.shard_len, element);
            self.copy(input, offset, sharded, 0, p.shard_len);
            self.trained[index].1 = Some(sharded);
            offset += p.shard_len;
        }
        self.sharding().reducing.push(input);
    }

    /// `len` values of `from` at `from_offset` into `to` at `to_offset`.
    fn copy(&mut self, from: Tensor, from_offset: u64, to: Tensor, to_offset: u64, len: u64) {
        self.emit(Instr::CopyRange {
            from: self.slot(from),
            from_offset,
            to: self.slot(to),
            to_offset,
            len,
        });
    }
}

/// FSDP's hooks: on a group's output its pre-backward, on its input its post-backward, each
/// run when the tensor's gradient has arrived, the gradient handed on as it is.
#[derive(Debug)]
enum Hook {
    PreBackward(usize),
    PostBackward(usize),
}

impl Backward for Hook {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        match *self {
            Hook::PreBackward(group) => pass.graph.pre_backward(group),
            Hook::PostBackward(group) => pass.graph.post_backward(group),
        }
        vec![grads[0].map(|grad| pass.pass_through(grad))]
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::shard_len;
    use crate::Job;

    proptest! {
        /// A rank's padded shard holds a `world`-th of the rows, rounded up: `world` of them
        /// hold every row, and one row fewer each would not.
        #[test]
        fn shards_cover_the_rows_with_less_than_a_row_of_padding_a_rank(
            rows in 1u64..5000, per_row in 1u64..300, world in 1u64..64
        ) {
            let elements = rows * per_row;
            let shard = shard_len(elements, rows, world);
            prop_assert_eq!(shard % per_row, 0);
            prop_assert!(shard * world >= elements);
            prop_assert!((shard / per_row - 1) * world < rows);
        }
    }

    /// A model over 10 features: a linear layer, a residual block, the head over 3 classes.
    fn job(extra: Value) -> Result<Job, crate::JobError> {
        let mut job = json!({
            "model": {"input_shape": [10], "num_classes": 3, "layers": [
                {"linear": {"out_features": 6}},
                {"residual": {"layers": [{"layer_norm": {}}, {"linear": {"out_features": 6}}]}},
                {"linear": {"out_features": 3}}
            ]},
            "optimizer": {"name": "adamw"},
            "world_size": 4, "sharding": "fsdp"
        });
        for (key, value) in extra.as_object().unwrap() {
            job[key] = value.clone();
        }
        Job::from_value(job)
    }

    #[test]
    fn adam_keeps_two_moments_of_each_padded_shard() {
        // Over 4 ranks, rank 0's rows: 2 of 6 (weights of 10 and of 6 values a row, biases and
        // the norm's), 1 of 3 (the head's 6 a row): 20 + 2 + 2 + 2 + 12 + 2 + 6 + 1 = 47 values.
        let sharded = job(json!({})).unwrap();
        let state = |job: &Job| job.plan().memory(8).unwrap().optimizer_state;
        assert_eq!(state(&sharded), 2 * 47 * 4);
        assert!(sharded
            .summary()
            .ends_with("adamw, 32-true, pytorch, fsdp over 4"));
        // Unsharded, the model's 141 values.
        let whole = job(json!({"sharding": "none"})).unwrap();
        assert_eq!(state(&whole), 2 * 141 * 4);
    }

    #[test]
    fn a_step_is_as_long_over_a_million_ranks_as_over_two() {
        let length = |world: u64| {
            let job = job(json!({ "world_size": world })).unwrap();
            job.plan().program(8, 0).unwrap().step.len()
        };
        assert_eq!(length(1 << 20), length(2));
    }

    #[test]
    fn blocks_kept_gathered_hold_their_parameters_from_forward_to_backward() {
        let block = json!({"residual": {"layers": [
            {"layer_norm": {}}, {"linear": {"out_features": 6}}
        ]}});
        let model = json!({"input_shape": [10], "num_classes": 3, "layers": [
            {"linear": {"out_features": 6}}, block, block, block, {"linear": {"out_features": 3}}
        ]});
        let peak = |reshard: bool| {
            let extra = json!({"model": model, "reshard_after_forward": reshard});
            job(extra).unwrap().plan().memory(8).unwrap()
        };
        let (resharded, kept) = (peak(true), peak(false));
        // A block gathered over 4 ranks: its norm's 6 + 6 and its linear layer's 6 x 6 + 6
        // values, each padded to 8 rows, 72 values. At the peak (the last block's backward)
        // resharding holds that block and the next one's prefetched all-gather, two blocks'
        // worth; kept, all three are held.
        assert_eq!(kept.parameters - resharded.parameters, 72 * 4);
        assert_eq!(kept.total - resharded.total, 72 * 4);
        assert!(job(json!({"reshard_after_forward": false}))
            .unwrap()
            .summary()
            .ends_with("fsdp over 4 kept gathered"));
    }

    #[test]
    fn what_fsdp_is_not_modelled_over_is_named() {
        for (extra, reason) in [
            (json!({"world_size": 1}), "FSDP over one GPU shards nothing"),
            (json!({"framework": "headroom"}), "FSDP is PyTorch's"),
            (
                json!({"model": {"input_shape": [10], "num_classes": 3, "layers": [
                    {"residual": {"layers": [
                        {"checkpoint": {"layers": [{"linear": {"out_features": 10}}]}}
                    ]}},
                    {"linear": {"out_features": 3}}
                ]}}),
                "activation checkpointing inside another layer",
            ),
            (
                json!({"precision": "bf16-true", "model": {
                    "input_shape": [10], "num_classes": 3,
                    "lora": {"r": 2, "target_modules": "all-linear"},
                    "layers": [{"linear": {"out_features": 6}}, {"linear": {"out_features": 3}}]
                }}),
                "f32 LoRA adapters in a bf16 model",
            ),
        ] {
            let error = job(extra.clone()).unwrap_err();
            assert_eq!(error.field, "sharding", "{extra}");
            assert!(error.reason.contains(reason), "{extra}: {}", error.reason);
        }
        let unsharded = json!({"sharding": "none", "reshard_after_forward": false});
        let error = job(unsharded).unwrap_err();
        assert_eq!(error.field, "reshard_after_forward");
        assert!(error.reason.contains("FSDP's"), "{}", error.reason);
    }

    #[test]
    fn a_hugging_face_config_is_sharded_a_decoder_layer_a_group() {
        let config = json!({
            "model_type": "llama", "vocab_size": 100, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1
        });
        let llama = job(json!({
            "model": {"huggingface": config, "tokens": {"sequence_length": 8}}
        }))
        .unwrap();
        let sharding = |job: &Job| job.plan().sharding.map(|s| (s.world, s.blocks_per_group));
        assert_eq!(sharding(&llama), Some((4, 2)));
        assert_eq!(sharding(&job(json!({})).unwrap()), Some((4, 1)));
    }
}
