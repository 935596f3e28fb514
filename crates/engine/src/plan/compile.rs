//! A plan's training step at one batch size, recorded on a [`Graph`]: in setup, the parameters
//! and buffers in the model's order, each trained one's optimizer state, the loader's batch and
//! its labels, and their first values; then the step: the model's forward (under autocast in
//! the mixed precisions), the loss, backward from it, and the optimizer's update of every
//! parameter, with the temporaries of PyTorch's `foreach` update and `zero_grad`'s frees.

use std::ops::Range;

use super::{Plan, Sharding};
use crate::memory::{Element, Part, Storage};
use crate::modules::{cross_entropy, LayerError, LayerSpec, Module, Parameter};
use crate::modules::{ParameterKind, Parameters};
use crate::program::graph::{Graph, ShardGroup, ShardedParameter, Tensor};
use crate::program::{Instr, Moment, OptimizerState, Program, Scale, Slot};
use crate::synthetic;

/// Why a step has no program.
#[derive(Debug)]
pub enum NoProgram {
    /// A buffer's size passes `u64`.
    Overflow,
    /// A module met a case whose memory headroom does not model.
    Refused(LayerError),
}

/// The step of `plan` at `rows` samples, its synthetic batch and first parameters from `seed`.
pub fn compile(plan: &Plan, rows: u64, seed: u64) -> Result<Program, NoProgram> {
    let mut graph = Graph::new(rows, plan.precision, seed, plan.framework, plan.tracing);
    let master = plan.precision.master();
    let declared = plan.model().parameters();
    let world = plan.sharding.map(|sharding| sharding.world);
    let tensors = declare_parameters(&mut graph, &declared, seed, world);
    let groups = plan
        .sharding
        .map(|sharding| shard_groups(&mut graph, plan, sharding, &tensors.sharded));
    let frozen = declared
        .iter()
        .zip(&tensors.held)
        .filter(|(p, _)| matches!(p.kind, ParameterKind::Frozen { .. }))
        .map(|(_, &tensor)| (graph.slot(tensor), graph.elements(tensor)))
        .collect();
    let per_parameter = plan.optimizer.state_per_parameter();
    let states = optimizer_states(&mut graph, per_parameter);
    let features = plan.input_features();
    let batch = graph.times_rows(features);
    let label_count = graph.times_rows(plan.loss_positions());
    // The loader's batch: f32 values, or int64 token ids.
    let loaded_as = match plan.vocab() {
        Some(_) => Element::Index,
        None => Element::Value(Storage::F32),
    };
    let loaded = graph.allocate(Part::BatchData, batch, loaded_as);
    let labels = graph.allocate(Part::BatchData, label_count, Element::Label);
    let row_loss = graph.allocate(Part::Activations, label_count, Element::Value(Storage::F32));
    let loss_sum = graph.allocate(Part::Activations, 1, Element::Value(Storage::F32));
    let overflow = plan
        .precision
        .scales_loss()
        .then(|| graph.allocate(Part::Activations, 1, Element::Value(Storage::F32)));
    let input_key = synthetic::stream_key(seed, synthetic::INPUT_STREAM);
    graph.emit(match plan.vocab() {
        Some(vocab) => Instr::FillTokens {
            out: graph.slot(loaded),
            len: batch,
            key: input_key,
            vocab,
        },
        None => Instr::FillUniform {
            out: graph.slot(loaded),
            len: batch,
            key: input_key,
            scale: 1.0,
        },
    });
    // One label a sample is learnable from its values; one a position is drawn.
    graph.emit(match (plan.vocab(), plan.loss_positions()) {
        (None, 1) => Instr::FillLabels {
            labels: graph.slot(labels),
            inputs: graph.slot(loaded),
            rows,
            features,
            classes: plan.num_classes(),
        },
        _ => Instr::FillTokens {
            out: graph.slot(labels),
            len: label_count,
            key: synthetic::stream_key(seed, synthetic::LABEL_STREAM),
            vocab: plan.num_classes(),
        },
    });
    // The loader delivers f32; bf16-true casts the batch and lets the f32 one go. Token ids
    // stay as they are.
    let input = match master {
        _ if plan.vocab().is_some() => loaded,
        Storage::F32 => loaded,
        _ => {
            let cast = graph.cast(loaded, master, Scale::One);
            graph.release(loaded);
            cast
        }
    };

    graph.enter(Moment::Forward);
    if plan.precision.is_mixed() {
        graph.begin_autocast();
    }
    let mut parameters = Parameters::new(&tensors.read);
    if let Some(step) = plan.hugging_face {
        graph.begin_model_output(step.use_cache);
    }
    let logits = model_forward(&mut graph, plan, groups.as_ref(), input, &mut parameters);
    graph.end_model_forward();
    // A Hugging Face model takes its loss inside its forward.
    let loss_in_forward = plan.hugging_face.is_some();
    if !loss_in_forward {
        end_forward(&mut graph, groups.is_some());
    }
    assert!(
        parameters.done(),
        "the model took every parameter it declared"
    );
    let (labels_slot, row_loss_slot) = (graph.slot(labels), graph.slot(row_loss));
    let root = cross_entropy::record(
        &mut graph,
        logits,
        (labels_slot, row_loss_slot),
        (label_count, plan.num_classes()),
        plan.hugging_face.is_some(),
    );
    graph.release(logits);
    if loss_in_forward {
        end_forward(&mut graph, groups.is_some());
    }
    graph.end_autocast();

    graph.enter(Moment::Backward);
    if let Some(groups) = groups.as_ref().filter(|_| loss_in_forward) {
        graph.pre_backward_at_loss(groups.root);
    }
    if let Some(root) = root {
        graph.backward(root);
    }
    if groups.is_some() {
        graph.end_sharded_backward();
    }

    graph.enter(Moment::Optimizer);
    let flag = overflow.map(|flag| graph.slot(flag));
    let (parameters, gradients) = update(&mut graph, states, flag);
    let inputs = (graph.slot(input), graph.slot(labels));
    let loss = (graph.slot(row_loss), graph.slot(loss_sum));
    if let Some((field, reason)) = graph.refused() {
        return Err(NoProgram::Refused(LayerError::new(field, reason)));
    }
    if graph.overflowed() {
        return Err(NoProgram::Overflow);
    }
    let recorded = graph.finish();
    Ok(Program {
        batch_size: rows,
        slots: recorded.slots,
        setup: recorded.setup,
        step: recorded.step,
        parameters,
        gradients,
        frozen,
        inputs,
        loss,
        loss_rows: label_count,
        scales_loss: overflow.is_some(),
    })
}

/// The model's parameters and buffers (`declared`, in its order) as the step holds them.
struct Declared {
    /// What the modules read of each: the parameter (unsharded, under FSDP) or the buffer.
    read: Vec<Tensor>,
    /// What setup holds of each: the parameter or buffer, or (under FSDP) its shard.
    held: Vec<Tensor>,
    /// Each one FSDP shards.
    sharded: Vec<Option<ShardedParameter>>,
}

/// A tensor for each of the model's parameters and buffers (`declared`, in its order), sharded
/// over `world` ranks when given (the learnt ones: FSDP leaves buffers whole), the learnt ones
/// (trained, frozen or adapters) filled with their first values (each from a stream of its own).
fn declare_parameters(
    graph: &mut Graph,
    declared: &[Parameter],
    seed: u64,
    world: Option<u64>,
) -> Declared {
    let master = Element::Value(graph.precision().master());
    if let Some(world) = world {
        graph.begin_sharding(world);
    }
    let mut tensors = Declared {
        read: Vec::with_capacity(declared.len()),
        held: Vec::with_capacity(declared.len()),
        sharded: Vec::with_capacity(declared.len()),
    };
    for (i, p) in declared.iter().enumerate() {
        let (element, trained, scale) = match p.kind {
            ParameterKind::Trained { scale } => (master, true, Some(scale)),
            // peft keeps adapters in f32 over a 16-bit model (`autocast_adapter_dtype`).
            ParameterKind::Adapter { scale } => (Element::Value(Storage::F32), true, Some(scale)),
            ParameterKind::Frozen { scale } => (master, false, Some(scale)),
            ParameterKind::Statistic => (master, false, None),
            ParameterKind::Count => (Element::Index, false, None),
        };
        let sharded = match (world, scale) {
            (Some(_), Some(_)) => {
                // Under a 16-bit model FSDP would all-gather f32 adapters and 16-bit weights
                // together (as bytes), which headroom does not follow.
                if element != master {
                    graph.refuse(
                        "sharding".into(),
                        "FSDP over f32 LoRA adapters in a bf16 model is not modelled: train the \
                         model in 32-true or a mixed precision, or leave sharding out"
                            .into(),
                    );
                }
                Some(graph.sharded_parameter(p.elements, p.rows, element, trained))
            }
            _ => None,
        };
        let (read, held) = match sharded {
            Some(parameter) => (parameter.gathered, parameter.shard),
            None => {
                let tensor = graph.parameter(p.elements, element, trained);
                (tensor, tensor)
            }
        };
        if let Some(scale) = scale {
            graph.emit(Instr::FillUniform {
                out: graph.slot(held),
                len: graph.elements(held),
                key: synthetic::stream_key(seed, synthetic::parameter_stream(i)),
                scale,
            });
        }
        tensors.read.push(read);
        tensors.held.push(held);
        tensors.sharded.push(sharded);
    }
    tensors
}

/// FSDP's groups: each `fully_shard` call's, by the top-level layers it takes, and the root's.
struct ShardGroups {
    /// Each group below the root, with the top-level layers it takes.
    units: Vec<(ShardGroup, Range<usize>)>,
    /// The model's own.
    root: ShardGroup,
}

/// The `sharded` parameters grouped as `fully_shard` on every run of
/// `sharding.blocks_per_group` top-level residual blocks, then on the model, groups them.
fn shard_groups(
    graph: &mut Graph,
    plan: &Plan,
    sharding: Sharding,
    sharded: &[Option<ShardedParameter>],
) -> ShardGroups {
    // Where each top-level layer's parameters start.
    let mut starts = vec![0];
    for layer in plan.listed().layers() {
        starts.push(starts[starts.len() - 1] + layer.parameters().len());
    }
    let kinds: Vec<Sharded> = plan
        .layers()
        .iter()
        .map(|spec| match spec {
            LayerSpec::Residual(_) => Sharded::InRun,
            LayerSpec::Checkpoint(_) => Sharded::Alone,
            _ => Sharded::WithRoot,
        })
        .collect();
    let mut units = Vec::new();
    let mut taken = vec![false; sharded.len()];
    for layers in block_runs(&kinds, sharding.blocks_per_group) {
        let members: Vec<ShardedParameter> = (starts[layers.start]..starts[layers.end])
            .filter_map(|p| {
                taken[p] = true;
                sharded[p]
            })
            .collect();
        units.push((
            graph.shard_group(members, sharding.reshard_after_forward),
            layers,
        ));
    }
    let rest = sharded
        .iter()
        .zip(&taken)
        .filter(|(_, &taken)| !taken)
        .filter_map(|(p, _)| *p)
        .collect();
    let root = graph.shard_group(rest, false);
    ShardGroups { units, root }
}

/// Where a top-level layer is sharded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sharded {
    /// In a run of residual blocks.
    InRun,
    /// Alone: an activation checkpoint, as `fully_shard` of a checkpointed block takes it.
    Alone,
    /// With the root.
    WithRoot,
}

/// The top-level layers each `fully_shard` below the root takes: every run of `per_group`
/// consecutive residual blocks, a shorter run where another layer or the list's end cuts one,
/// and each checkpoint alone (`kinds` says which layers are which).
fn block_runs(kinds: &[Sharded], per_group: usize) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let mut start = None;
    for (i, &kind) in kinds.iter().enumerate() {
        if kind != Sharded::InRun {
            runs.extend(start.take().map(|first| first..i));
            if kind == Sharded::Alone {
                runs.push(i..i + 1);
            }
            continue;
        }
        let first = *start.get_or_insert(i);
        if i + 1 - first == per_group {
            runs.push(first..i + 1);
            start = None;
        }
    }
    runs.extend(start.map(|first| first..kinds.len()));
    runs
}

/// What ends with the model's forward: what its output held goes, and under FSDP (`sharded`)
/// the root's post-forward lets the last all-gather's output go.
fn end_forward(graph: &mut Graph, sharded: bool) {
    graph.drop_model_output();
    if sharded {
        graph.end_sharded_forward();
    }
}

/// The model's forward, its top-level layers in order: under FSDP each group gathered around
/// its layers, the root's around them all (its post-forward's release of the last all-gather
/// left to the caller); in Hugging Face's step the head's input (the last hidden state) held by
/// the model's output.
fn model_forward(
    graph: &mut Graph,
    plan: &Plan,
    groups: Option<&ShardGroups>,
    input: Tensor,
    parameters: &mut Parameters<'_>,
) -> Tensor {
    let mut current = match groups {
        Some(groups) => graph.enter_shard_group(groups.root, input),
        None => {
            graph.retain(input);
            input
        }
    };
    let layers = plan.listed().layers();
    for (i, layer) in layers.iter().enumerate() {
        let unit = groups.and_then(|g| g.units.iter().find(|(_, layers)| layers.contains(&i)));
        if let Some(&(group, _)) = unit.filter(|(_, layers)| layers.start == i) {
            let entered = graph.enter_shard_group(group, current);
            graph.release(current);
            current = entered;
        }
        if i + 1 == layers.len() {
            graph.hold_in_output(current);
        }
        let next = layer.forward(graph, current, parameters);
        graph.release(current);
        current = next;
        if let Some(&(group, _)) = unit.filter(|(_, layers)| layers.end == i + 1) {
            let exited = graph.exit_shard_group(group, current);
            graph.release(current);
            current = exited;
        }
    }
    let Some(groups) = groups else {
        return current;
    };
    let logits = graph.exit_shard_group(groups.root, current);
    graph.release(current);
    logits
}

/// Each trained parameter's optimizer state, stored as the parameter is: none, momentum's
/// velocity, or Adam's moments.
fn optimizer_states(graph: &mut Graph, per_parameter: u64) -> Vec<OptimizerState<Slot>> {
    graph
        .trained()
        .to_vec()
        .into_iter()
        .map(|(tensor, _)| {
            let (len, storage) = (graph.elements(tensor), graph.storage(tensor));
            let mut state = (0..per_parameter).map(|_| {
                let moment = graph.allocate(Part::OptimizerState, len, Element::Value(storage));
                graph.slot(moment)
            });
            match per_parameter {
                0 => OptimizerState::Sgd,
                1 => OptimizerState::Momentum {
                    velocity: state.next().expect("one"),
                },
                _ => OptimizerState::Adam {
                    m: state.next().expect("two"),
                    v: state.next().expect("two"),
                },
            }
        })
        .collect()
}

/// Buffers, each with its length.
type Lengths = Vec<(Slot, u64)>;

/// The optimizer's update of every parameter a gradient reached (after `GradScaler`'s check,
/// given its `flag`), then `zero_grad(set_to_none=True)`; returns the parameters and their
/// gradients, each with its length.
fn update(
    graph: &mut Graph,
    states: Vec<OptimizerState<Slot>>,
    flag: Option<Slot>,
) -> (Lengths, Lengths) {
    let trained: Vec<(Tensor, Option<Tensor>)> = graph.trained().to_vec();
    let adam = states
        .iter()
        .any(|state| matches!(state, OptimizerState::Adam { .. }));
    let updates: Vec<(Tensor, Tensor, OptimizerState<Slot>)> = trained
        .into_iter()
        .zip(states)
        .filter_map(|((param, grad), state)| Some((param, grad?, state)))
        .collect();
    let gradients: Vec<(Slot, u64)> = updates
        .iter()
        .map(|&(_, grad, _)| (graph.slot(grad), graph.elements(grad)))
        .collect();
    // Adam's foreach update computes `sqrt(v)` of every parameter into a list of new tensors
    // (each stored as its parameter) before it applies the update; the fused kernel needs
    // none, and PyTorch's step holds their bytes while it updates.
    let held: Vec<Tensor> = match adam {
        true => updates
            .iter()
            .filter_map(|&(param, _, _)| {
                let storage = Element::Value(graph.storage(param));
                graph.pytorch_only(Part::OptimizerState, graph.elements(param), storage)
            })
            .collect(),
        false => Vec::new(),
    };
    if let Some(flag) = flag {
        graph.emit(Instr::CheckOverflow {
            gradients: gradients.clone(),
            flag,
        });
    }
    for &(param, grad, state) in &updates {
        graph.emit(Instr::OptimizerStep {
            param: graph.slot(param),
            grad: graph.slot(grad),
            state,
            len: graph.elements(param),
        });
    }
    for tensor in held.into_iter().rev() {
        graph.release(tensor);
    }
    // zero_grad(set_to_none=True).
    for &(_, grad, _) in &updates {
        graph.release(grad);
    }
    let parameters = updates
        .iter()
        .map(|&(param, _, _)| (graph.slot(param), graph.elements(param)))
        .collect();
    (parameters, gradients)
}

#[cfg(test)]
mod tests {
    use super::{block_runs, Sharded};

    #[test]
    fn fully_shard_takes_runs_of_blocks_cut_by_other_layers_and_the_end() {
        let (b, o, c) = (Sharded::InRun, Sharded::WithRoot, Sharded::Alone);
        assert_eq!(block_runs(&[o, b, b, b, b, o], 2), [1..3, 3..5]);
        assert_eq!(block_runs(&[o, b, b, b, o, b], 2), [1..3, 3..4, 5..6]);
        assert_eq!(block_runs(&[b, b, o, b], 1), [0..1, 1..2, 3..4]);
        assert!(block_runs(&[o, o], 1).is_empty());
        // A checkpoint is a group of its own, and cuts a run.
        assert_eq!(block_runs(&[o, c, c, o], 2), [1..2, 2..3]);
        assert_eq!(block_runs(&[b, c, b, b], 2), [0..1, 1..2, 2..4]);
    }
}
