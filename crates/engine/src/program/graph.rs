//! The builder a step is recorded on, as PyTorch's autograd records it.
//!
//! Modules record their forward here: they allocate their outputs, emit their kernels, and
//! [`Graph::record`] a node of the autograd graph with the tensors it saves for backward. A
//! tensor's values live in a storage that the step holds by reference: the Python variable a
//! layer's output is bound to, each node that saved it, the gradient buffers of backward, autocast's
//! cache; a view or an in-place result shares its input's storage. A storage is freed when its
//! last reference goes, which is when PyTorch's caching allocator gets the block back.
//!
//! [`Graph::backward`] then runs the nodes as PyTorch's engine does: latest first (a node runs
//! once every node that reads its outputs has run, and of those ready the one made last), each
//! allocating the gradients of its inputs, then releasing the gradients it was given and what
//! it saved, then handing its gradients on: to the node that made each input, added to what
//! already waits there (in place when nothing else holds it, [`Tracing`]), or to a
//! parameter's gradient at once (PyTorch's `AccumulateGrad` runs first of all that are ready).
//! Inside a checkpointed region what nodes save is packed away and recomputed in backward
//! ([`checkpoint`]).

use super::framework::{Framework, Tracing};
use super::instr::{Instr, Moment, Scale, Slot};
use crate::memory::{Buffer, Element, Part, Precision, Storage};

mod checkpoint;
mod fsdp;
mod model_output;

pub use checkpoint::{Recompute, Region};
use checkpoint::{RegionEntry, Saving};
pub use fsdp::{ShardGroup, ShardedParameter};

/// A tensor of the step: its values (a storage, maybe shared with views and in-place results)
/// and where its gradient goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tensor(usize);

/// Where a tensor's gradient goes in backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Nowhere: nothing it depends on is trained.
    None,
    /// Into output `output` of the node that made it.
    Node { node: usize, output: usize },
    /// Into a trained parameter's gradient (the parameter's index among the trained ones).
    Parameter(usize),
    /// Nowhere, though it needs one: made by a checkpointed region's recomputation, whose
    /// nodes are the first forward's ([`checkpoint`]).
    Recomputed,
}

#[derive(Debug)]
struct TensorEntry {
    storage: usize,
    elements: u64,
    element: Element,
    target: Target,
}

#[derive(Debug)]
struct StorageEntry {
    slot: Slot,
    part: Part,
    refs: u32,
    /// Tensors this storage keeps alive until it is freed ([`Graph::keep_alive_with`]).
    keeps: Vec<Tensor>,
    /// Never allocated: made after a recomputation stopped early ([`checkpoint`]).
    phantom: bool,
}

impl StorageEntry {
    /// A storage in `slot`, allocated, one reference to it.
    fn new(slot: Slot, part: Part) -> StorageEntry {
        StorageEntry {
            slot,
            part,
            refs: 1,
            keeps: Vec::new(),
            phantom: false,
        }
    }
}

/// A node's backward, as its module writes it: from the gradients of its outputs (`None` where
/// none arrived), the gradients of its inputs, in the order they were recorded (`None` where
/// [`Pass::needs`] says none is needed). A gradient it returns is a reference it hands on: made
/// by [`Pass::gradient`], or another reference to one it was given ([`Pass::pass_through`]).
pub trait Backward: std::fmt::Debug {
    /// Emits the node's backward on `pass`.
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>>;
}

#[derive(Debug)]
struct Node {
    backward: Option<Box<dyn Backward>>,
    inputs: Vec<Target>,
    saved: Vec<Tensor>,
    grads: Vec<Option<Tensor>>,
    reached: bool,
    /// The checkpointed region it was recorded in, if any ([`checkpoint`]).
    region: Option<usize>,
    /// Inside a region: what it saved, packed away in forward rather than kept; and what
    /// the recomputation made of each, which its backward reads in their place.
    packed: Vec<Tensor>,
    substitutes: Vec<(Tensor, Tensor)>,
}

/// The instructions as the framework places them.
#[derive(Debug)]
struct Code {
    framework: Framework,
    slots: usize,
    setup: Vec<Instr>,
    step: Vec<Instr>,
    in_setup: bool,
    /// After a recomputation stopped early: nothing more is allocated or run until it ends.
    stopped: bool,
}

impl Code {
    fn push(&mut self, instr: Instr) {
        if self.stopped && !matches!(instr, Instr::Free(_)) {
            return;
        }
        match self.in_setup {
            true => self.setup.push(instr),
            false => self.step.push(instr),
        }
    }

    /// An allocation where the framework makes it: in place for PyTorch, before the first step
    /// for headroom's own step.
    fn alloc(&mut self, buffer: Buffer) -> Slot {
        let slot = self.reserve();
        let instr = Instr::Alloc { slot, buffer };
        match self.framework {
            Framework::Pytorch => self.push(instr),
            Framework::Headroom => self.setup.push(instr),
        }
        slot
    }

    /// A slot for a buffer the step allocates later ([`Code::alloc_into`]).
    fn reserve(&mut self) -> Slot {
        self.slots += 1;
        Slot(self.slots - 1)
    }

    /// `buffer` allocated into `slot` (reserved, or freed before).
    fn alloc_into(&mut self, slot: Slot, buffer: Buffer) {
        self.push(Instr::Alloc { slot, buffer });
    }

    /// A free, which headroom's own step never makes.
    fn free(&mut self, slot: Slot) {
        if self.framework == Framework::Pytorch {
            self.push(Instr::Free(slot));
        }
    }
}

/// A training step being recorded.
#[derive(Debug)]
pub struct Graph {
    code: Code,
    tracing: Tracing,
    rows: u64,
    precision: Precision,
    seed: u64,
    overflowed: bool,
    /// Why the step cannot be modelled as PyTorch runs it, from the first module that said so:
    /// the field at fault and the reason.
    refused: Option<(String, String)>,
    /// What the model's forward made once for its layers to share, by name, until it ends.
    shared: Vec<(String, Vec<Tensor>)>,
    tensors: Vec<TensorEntry>,
    storages: Vec<StorageEntry>,
    nodes: Vec<Node>,
    /// Each trained parameter's tensor, and its gradient once backward has made it.
    trained: Vec<(Tensor, Option<Tensor>)>,
    /// While autocast is on, its cache: each parameter's half copy, in the order made.
    autocast: Option<Vec<(Tensor, Tensor)>>,
    /// What a node's saved tensors become: kept, or packed away inside a checkpointed region.
    saving: Saving,
    /// The checkpointed regions of the forward, in order.
    regions: Vec<RegionEntry>,
    /// Where in the step's code the running recomputation began.
    recomputation_began: usize,
    /// The sharding of the parameters over ranks (FSDP), if any.
    fsdp: Option<fsdp::Fsdp>,
    /// In Hugging Face's step, what the model's output holds while the loss is taken.
    model_output: Option<model_output::ModelOutput>,
}

/// The outputs of a program's recording: its slots and instructions.
pub struct Recorded {
    /// How many slots an executor needs.
    pub slots: usize,
    /// Before the first step.
    pub setup: Vec<Instr>,
    /// Every step.
    pub step: Vec<Instr>,
}

impl Graph {
    /// A step of `rows` samples in `precision`, its random streams from `seed`, placed as
    /// `framework` does, as `tracing` says.
    pub fn new(
        rows: u64,
        precision: Precision,
        seed: u64,
        framework: Framework,
        tracing: Tracing,
    ) -> Graph {
        Graph {
            code: Code {
                framework,
                slots: 0,
                setup: vec![Instr::Enter(Moment::Setup)],
                step: Vec::new(),
                in_setup: true,
                stopped: false,
            },
            tracing,
            rows,
            precision,
            seed,
            overflowed: false,
            refused: None,
            shared: Vec::new(),
            tensors: Vec::new(),
            storages: Vec::new(),
            nodes: Vec::new(),
            trained: Vec::new(),
            autocast: None,
            saving: Saving::Kept,
            regions: Vec::new(),
            recomputation_began: 0,
            fsdp: None,
            model_output: None,
        }
    }

    /// Samples in the batch.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The seed of the step's synthetic data, parameters and dropout masks.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The step's precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// How activations are stored, and the products' operands.
    pub fn compute(&self) -> Storage {
        self.precision.compute()
    }

    /// `rows` times `per_row`; a product past `u64` marks the step as overflowing (no program
    /// comes of it) and counts as 0 meanwhile.
    pub fn times_rows(&mut self, per_row: u64) -> u64 {
        self.rows.checked_mul(per_row).unwrap_or_else(|| {
            self.overflowed = true;
            0
        })
    }

    /// Whose step this is.
    pub fn framework(&self) -> Framework {
        self.code.framework
    }

    /// Whether some size passed `u64`.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Marks the step as one headroom cannot model (no program comes of it): a module met a
    /// case whose memory it does not follow; `field` is its place in the job, `reason` says
    /// what would work.
    pub fn refuse(&mut self, field: String, reason: String) {
        self.refused.get_or_insert((field, reason));
    }

    /// Why the step cannot be modelled, if a module said so: the field and the reason.
    pub fn refused(&mut self) -> Option<(String, String)> {
        self.refused.take()
    }

    /// What follows belongs to `moment`.
    pub fn enter(&mut self, moment: Moment) {
        self.code.in_setup = false;
        self.code.step.push(Instr::Enter(moment));
    }

    /// Emits a kernel.
    pub fn emit(&mut self, instr: Instr) {
        self.code.push(instr);
    }

    /// A new buffer of `elements` of `element`, counted in `part`, held by the caller.
    pub fn allocate(&mut self, part: Part, elements: u64, element: Element) -> Tensor {
        let phantom = self.code.stopped;
        let slot = match phantom {
            true => Slot(usize::MAX),
            false => self.code.alloc(Buffer {
                part,
                elements,
                element,
            }),
        };
        let storage = StorageEntry {
            phantom,
            ..StorageEntry::new(slot, part)
        };
        self.entry(storage, elements, element, Target::None)
    }

    /// A tensor over `storage`, new, one reference to it.
    fn entry(
        &mut self,
        storage: StorageEntry,
        elements: u64,
        element: Element,
        target: Target,
    ) -> Tensor {
        self.storages.push(storage);
        self.tensors.push(TensorEntry {
            storage: self.storages.len() - 1,
            elements,
            element,
            target,
        });
        Tensor(self.tensors.len() - 1)
    }

    /// A buffer PyTorch allocates and headroom's kernels do not need (held for its bytes, never
    /// written): in PyTorch's step only.
    pub fn pytorch_only(&mut self, part: Part, elements: u64, element: Element) -> Option<Tensor> {
        (self.code.framework == Framework::Pytorch).then(|| self.allocate(part, elements, element))
    }

    /// A buffer CUDA's PyTorch allocates inside an operation and frees before it returns
    /// (FlashAttention-2's backward accumulators): in PyTorch's step when untraced only, as a
    /// tracer never sees it ([`Tracing`]); held for its bytes, never written.
    pub fn cuda_workspace(&mut self, elements: u64, element: Element) -> Option<Tensor> {
        let untraced = self.tracing == Tracing::Untraced;
        (self.code.framework == Framework::Pytorch && untraced)
            .then(|| self.allocate(Part::Activations, elements, element))
    }

    /// A new activation of `elements` values stored as `storage`, held by the caller.
    pub fn output(&mut self, elements: u64, storage: Storage) -> Tensor {
        self.allocate(Part::Activations, elements, Element::Value(storage))
    }

    /// A trained parameter or a buffer the model keeps between steps, allocated now (in setup).
    pub fn parameter(&mut self, elements: u64, element: Element, trained: bool) -> Tensor {
        let tensor = self.allocate(Part::Parameters, elements, element);
        if trained {
            self.tensors[tensor.0].target = Target::Parameter(self.trained.len());
            self.trained.push((tensor, None));
        }
        tensor
    }

    /// The slot of `tensor`'s values.
    pub fn slot(&self, tensor: Tensor) -> Slot {
        self.storages[self.tensors[tensor.0].storage].slot
    }

    /// Elements of `tensor`.
    pub fn elements(&self, tensor: Tensor) -> u64 {
        self.tensors[tensor.0].elements
    }

    /// How `tensor`'s values are stored.
    ///
    /// # Panics
    /// If it holds no values (a mask, indices, labels): modules ask only of their values.
    pub fn storage(&self, tensor: Tensor) -> Storage {
        match self.tensors[tensor.0].element {
            Element::Value(storage) => storage,
            other => panic!("a tensor of {other:?} has no value storage"),
        }
    }

    /// Whether backward computes a gradient for `tensor`.
    pub fn requires_grad(&self, tensor: Tensor) -> bool {
        self.tensors[tensor.0].target != Target::None
    }

    /// Another reference to `tensor`'s storage.
    pub fn retain(&mut self, tensor: Tensor) {
        self.storages[self.tensors[tensor.0].storage].refs += 1;
    }

    /// [`Graph::release`] of a buffer that may not exist (a [`Graph::pytorch_only`] one in
    /// headroom's own step).
    pub fn release_optional(&mut self, tensor: Option<Tensor>) {
        if let Some(tensor) = tensor {
            self.release(tensor);
        }
    }

    /// Gives up a reference to `tensor`'s storage: the last one frees it, and lets go of what
    /// it kept alive.
    pub fn release(&mut self, tensor: Tensor) {
        let storage = &mut self.storages[self.tensors[tensor.0].storage];
        storage.refs -= 1;
        if storage.refs == 0 {
            let (slot, phantom) = (storage.slot, storage.phantom);
            let kept = std::mem::take(&mut storage.keeps);
            if !phantom {
                self.code.free(slot);
            }
            for tensor in kept {
                self.release(tensor);
            }
        }
    }

    /// Keeps `kept`'s storage alive as long as `holder`'s: what a view does to the tensor it
    /// views, for an output headroom copies where PyTorch views (a selected position).
    pub fn keep_alive_with(&mut self, holder: Tensor, kept: Tensor) {
        self.retain(kept);
        let storage = self.tensors[holder.0].storage;
        self.storages[storage].keeps.push(kept);
    }

    /// A new tensor on `tensor`'s storage with its gradient's destination (a view, such as
    /// `flatten`'s), held by the caller. An in-place operation records a node whose output it is.
    pub fn alias(&mut self, tensor: Tensor) -> Tensor {
        let entry = &self.tensors[tensor.0];
        let alias = TensorEntry {
            storage: entry.storage,
            elements: entry.elements,
            element: entry.element,
            target: entry.target,
        };
        self.retain(tensor);
        self.tensors.push(alias);
        Tensor(self.tensors.len() - 1)
    }

    /// Records an autograd node: `backward` computes the gradients of `inputs` from those of
    /// `outputs`, and `saved` stay alive until it has run. Nothing is recorded (and nothing
    /// saved) when no input needs a gradient. Returns the node, if recorded. Inside a
    /// checkpointed region `saved` are packed away instead; while one is recomputed no node is
    /// recorded, and what `saved` names goes to the nodes that packed it ([`checkpoint`]).
    pub fn record(
        &mut self,
        backward: impl Backward + 'static,
        inputs: &[Tensor],
        saved: &[Tensor],
        outputs: &[Tensor],
    ) -> Option<usize> {
        if !inputs.iter().any(|&t| self.requires_grad(t)) {
            return None;
        }
        if let Saving::Recomputing { .. } = self.saving {
            for tensor in outputs {
                self.tensors[tensor.0].target = Target::Recomputed;
            }
            self.unpack(saved, outputs);
            return None;
        }
        let node = self.nodes.len();
        let (region, packed) = match self.saving {
            Saving::Packed(region) => (Some(region), saved.to_vec()),
            _ => {
                for &tensor in saved {
                    self.retain(tensor);
                }
                (None, Vec::new())
            }
        };
        if let Some(region) = region {
            self.pack(region, node, saved);
        }
        for (output, tensor) in outputs.iter().enumerate() {
            self.tensors[tensor.0].target = Target::Node { node, output };
        }
        self.nodes.push(Node {
            backward: Some(Box::new(backward)),
            inputs: inputs.iter().map(|t| self.tensors[t.0].target).collect(),
            saved: match region {
                Some(_) => Vec::new(),
                None => saved.to_vec(),
            },
            grads: vec![None; outputs.len()],
            reached: false,
            region,
            packed,
            substitutes: Vec::new(),
        });
        Some(node)
    }

    /// Turns autocast on (the mixed precisions): parameters read by products are cast once,
    /// into its cache, and kept there until [`Graph::end_autocast`].
    pub fn begin_autocast(&mut self) {
        self.autocast = Some(Vec::new());
    }

    /// The tensors the model's forward shares among its layers under `name` (a model's rotary
    /// tables, as Hugging Face's `LlamaModel` makes them once for every layer), made by `make`
    /// at the first layer that asks. References the caller does not own: it records them as
    /// saved to keep them past the forward.
    pub fn shared(
        &mut self,
        name: &str,
        make: impl FnOnce(&mut Graph) -> Vec<Tensor>,
    ) -> Vec<Tensor> {
        self.note_shared(name);
        if let Some((_, tensors)) = self.shared.iter().find(|(n, _)| n == name) {
            return tensors.clone();
        }
        let tensors = make(self);
        self.shared.push((name.to_string(), tensors.clone()));
        tensors
    }

    /// The model's forward is over: what it shared among its layers is let go.
    pub fn end_model_forward(&mut self) {
        for tensor in std::mem::take(&mut self.shared)
            .into_iter()
            .flat_map(|(_, t)| t)
        {
            self.release(tensor);
        }
    }

    /// Leaves autocast: its cache lets its copies go (those backward saved stay until used).
    pub fn end_autocast(&mut self) {
        for (_, cast) in self.autocast.take().unwrap_or_default() {
            self.release(cast);
        }
    }

    /// What a product reads of `tensor` (an input or an activation): under autocast, a half copy
    /// when it is stored otherwise (the f32 batch), made now and recorded as a cast; else
    /// `tensor` itself. A reference the caller releases.
    pub fn operand(&mut self, tensor: Tensor) -> Tensor {
        let compute = self.compute();
        if self.autocast.is_none() || self.storage(tensor) == compute {
            self.retain(tensor);
            return tensor;
        }
        self.cast(tensor, compute, Scale::One)
    }

    /// What an operation on CUDA autocast's f32 list (`pow`, ...) reads of `tensor`: under
    /// autocast, an f32 copy when it is stored otherwise, made now and recorded as a cast; else
    /// `tensor` itself. A reference the caller releases.
    pub fn wide_operand(&mut self, tensor: Tensor) -> Tensor {
        if self.autocast.is_none() || self.storage(tensor) == Storage::F32 {
            self.retain(tensor);
            return tensor;
        }
        self.cast(tensor, Storage::F32, Scale::One)
    }

    /// What a product reads of the parameter `tensor`: under autocast, its half copy from the
    /// cache (made at its first use) when it is trained, a new one at each use when it is
    /// frozen (autocast caches casts of leaves that require grad only); else the parameter. A
    /// reference the caller releases.
    pub fn operand_parameter(&mut self, tensor: Tensor) -> Tensor {
        if !self.requires_grad(tensor) {
            return self.operand(tensor);
        }
        let Some(cache) = &self.autocast else {
            self.retain(tensor);
            return tensor;
        };
        if let Some(&(_, cast)) = cache.iter().find(|(p, _)| *p == tensor) {
            self.retain(cast);
            return cast;
        }
        let cast = self.cast(tensor, self.compute(), Scale::One);
        self.retain(cast);
        if let Some(cache) = &mut self.autocast {
            cache.push((tensor, cast));
        }
        cast
    }

    /// `tensor` converted to `storage` (counted where it is), its cast recorded for backward,
    /// which converts the gradient back times `backward_scale`.
    pub fn cast(&mut self, tensor: Tensor, storage: Storage, backward_scale: Scale) -> Tensor {
        let entry = &self.tensors[tensor.0];
        let (part, elements, from) = (
            self.storages[entry.storage].part,
            entry.elements,
            self.storage(tensor),
        );
        let cast = self.allocate(part, elements, Element::Value(storage));
        self.emit(Instr::Convert {
            from: self.slot(tensor),
            to: self.slot(cast),
            len: elements,
            scale: Scale::One,
        });
        self.record(
            CastBackward {
                elements,
                to: from,
                scale: backward_scale,
            },
            &[tensor],
            &[],
            &[cast],
        );
        cast
    }

    /// A new activation holding `tensor`'s values times `scale`, in its storage, not recorded.
    /// A reference the caller owns.
    pub fn scaled_copy(&mut self, tensor: Tensor, scale: Scale) -> Tensor {
        let (len, storage) = (self.elements(tensor), self.storage(tensor));
        let copy = self.output(len, storage);
        self.emit(Instr::Convert {
            from: self.slot(tensor),
            to: self.slot(copy),
            len,
            scale,
        });
        copy
    }

    /// `tensor * factor` (a Python number): a new activation in `tensor`'s storage, recorded;
    /// backward scales the gradient by the same factor. A reference the caller owns.
    pub fn times(&mut self, tensor: Tensor, factor: f32) -> Tensor {
        let (len, storage) = (self.elements(tensor), self.storage(tensor));
        let scaled = self.scaled_copy(tensor, Scale::By(factor));
        let backward = CastBackward {
            elements: len,
            to: storage,
            scale: Scale::By(factor),
        };
        self.record(backward, &[tensor], &[], &[scaled]);
        scaled
    }

    /// Runs backward from `root`, the loss's node, whose output's gradient is implied (the
    /// scalar 1 PyTorch's `backward()` starts from, not allocated).
    pub fn backward(&mut self, root: usize) {
        self.nodes[root].reached = true;
        for n in (0..self.nodes.len()).rev() {
            if !self.nodes[n].reached {
                continue;
            }
            self.unpacking(n);
            let backward = self.nodes[n].backward.take().expect("a node runs once");
            let grads = std::mem::take(&mut self.nodes[n].grads);
            let inputs = self.nodes[n].inputs.clone();
            let substitutes = std::mem::take(&mut self.nodes[n].substitutes);
            let mut pass = Pass {
                graph: self,
                node: n,
                inputs: &inputs,
                substitutes: &substitutes,
                consumed: Vec::new(),
            };
            let produced = backward.backward(&mut pass, &grads);
            let consumed = pass.consumed;
            assert_eq!(
                produced.len(),
                inputs.len(),
                "{backward:?} returns a gradient per input"
            );
            for grad in grads.into_iter().flatten() {
                if !consumed.contains(&grad) {
                    self.release(grad);
                }
            }
            for saved in std::mem::take(&mut self.nodes[n].saved) {
                self.release(saved);
            }
            self.unpacked(n);
            for (&target, grad) in inputs.iter().zip(produced) {
                if let Some(grad) = grad {
                    self.deliver(target, grad);
                }
            }
        }
    }

    /// Hands `grad` on to `target`.
    fn deliver(&mut self, target: Target, grad: Tensor) {
        match target {
            Target::None | Target::Recomputed => self.release(grad),
            Target::Node { node, output } => {
                self.nodes[node].reached = true;
                let summed = match self.nodes[node].grads[output] {
                    None => grad,
                    Some(waiting) => self.accumulate(waiting, grad),
                };
                self.nodes[node].grads[output] = Some(summed);
            }
            Target::Parameter(index) => {
                let summed = match self.trained[index].1 {
                    None => grad,
                    Some(waiting) => self.accumulate(waiting, grad),
                };
                self.trained[index].1 = Some(summed);
            }
        }
    }

    /// `waiting + arrived`, as PyTorch's `InputBuffer` sums them: into `waiting` in place when
    /// nothing else holds it (untraced), else into a new tensor.
    fn accumulate(&mut self, waiting: Tensor, arrived: Tensor) -> Tensor {
        let alone = self.storages[self.tensors[waiting.0].storage].refs == 1;
        let len = self.elements(waiting);
        if alone && self.tracing == Tracing::Untraced {
            self.emit(Instr::Accumulate {
                from: self.slot(arrived),
                into: self.slot(waiting),
                len,
            });
            self.release(arrived);
            return waiting;
        }
        let entry = &self.tensors[waiting.0];
        let (part, element) = (self.storages[entry.storage].part, entry.element);
        let sum = self.allocate(part, len, element);
        self.emit(Instr::Add {
            a: self.slot(waiting),
            b: self.slot(arrived),
            out: self.slot(sum),
            len,
        });
        self.release(waiting);
        self.release(arrived);
        sum
    }

    /// Every trained parameter in the order made, with its gradient (after backward).
    pub fn trained(&self) -> &[(Tensor, Option<Tensor>)] {
        &self.trained
    }

    /// The recorded program.
    pub fn finish(self) -> Recorded {
        Recorded {
            slots: self.code.slots,
            setup: self.code.setup,
            step: self.code.step,
        }
    }
}

/// A node's backward being recorded: what it may ask of the graph.
pub struct Pass<'a> {
    graph: &'a mut Graph,
    /// The node running.
    node: usize,
    inputs: &'a [Target],
    /// What a checkpointed node reads in place of each tensor it saved: its recomputation.
    substitutes: &'a [(Tensor, Tensor)],
    /// The output gradients this backward let go of itself ([`Pass::consume`]).
    consumed: Vec<Tensor>,
}

impl Pass<'_> {
    /// `tensor`, or its recomputation where the node saved it inside a checkpointed region.
    fn resolve(&self, tensor: Tensor) -> Tensor {
        self.substitutes
            .iter()
            .find(|(saved, _)| *saved == tensor)
            .map_or(tensor, |&(_, recomputed)| recomputed)
    }

    /// The node's own computation is over; what follows is the engine's (`validate_outputs`
    /// summing a broadcast input's gradient to its shape). What a checkpointed node unpacked
    /// goes now: its computation held it, not a saved variable.
    pub fn applied(&mut self) {
        self.graph.drop_unpacked(self.node);
    }

    /// Whether input `k` needs a gradient.
    pub fn needs(&self, k: usize) -> bool {
        self.inputs[k] != Target::None
    }

    /// A new gradient for input `k`, of `elements` stored as `storage`: counted with the
    /// gradients when it is a parameter's, else with the activations.
    pub fn gradient(&mut self, k: usize, elements: u64, storage: Storage) -> Tensor {
        let part = match self.inputs[k] {
            Target::Parameter(_) => Part::Gradients,
            _ => Part::Activations,
        };
        self.graph.allocate(part, elements, Element::Value(storage))
    }

    /// `grad` handed to input `k`: unchanged, or converted into a new gradient where `k` is
    /// stored as `storage` and `grad` otherwise (autograd's cast of a gradient to its input's
    /// type).
    pub fn gradient_as(&mut self, k: usize, grad: Tensor, storage: Storage) -> Tensor {
        if self.storage(grad) == storage {
            return self.pass_through(grad);
        }
        let len = self.elements(grad);
        let converted = self.gradient(k, len, storage);
        self.emit(Instr::Convert {
            from: self.slot(grad),
            to: self.slot(converted),
            len,
            scale: Scale::One,
        });
        converted
    }

    /// A buffer PyTorch's backward allocates and headroom's kernels do not need (see
    /// [`Graph::pytorch_only`]).
    pub fn pytorch_only(&mut self, elements: u64, storage: Storage) -> Option<Tensor> {
        self.graph
            .pytorch_only(Part::Activations, elements, Element::Value(storage))
    }

    /// A buffer CUDA's PyTorch allocates inside this backward (see [`Graph::cuda_workspace`]).
    pub fn cuda_workspace(&mut self, elements: u64, storage: Storage) -> Option<Tensor> {
        self.graph.cuda_workspace(elements, Element::Value(storage))
    }

    /// Another reference to `grad`, to hand on unchanged.
    pub fn pass_through(&mut self, grad: Tensor) -> Tensor {
        self.graph.retain(grad);
        grad
    }

    /// Gives up a reference (a temporary of this backward).
    pub fn release(&mut self, tensor: Tensor) {
        self.graph.release(self.resolve(tensor));
    }

    /// [`Pass::release`] of a buffer that may not exist (a [`Pass::pytorch_only`] one).
    pub fn release_optional(&mut self, tensor: Option<Tensor>) {
        if let Some(tensor) = tensor {
            self.release(tensor);
        }
    }

    /// Lets the output's gradient `grad` go now, before this backward hands its own on (as
    /// autograd frees a node's input buffer before the engine sums what the node returned).
    pub fn consume(&mut self, grad: Tensor) {
        self.consumed.push(grad);
        self.graph.release(grad);
    }

    /// Whether gradients meeting at one tensor are summed into the first in place (PyTorch
    /// untraced), rather than into a new tensor.
    pub fn sums_in_place(&self) -> bool {
        self.graph.tracing == Tracing::Untraced
    }

    /// `grads`, a gradient for each input in order, handed on where [`Pass::needs`] says it is
    /// needed and released where not (a kernel that writes every gradient at once).
    pub fn where_needed(&mut self, grads: impl IntoIterator<Item = Tensor>) -> Vec<Option<Tensor>> {
        grads
            .into_iter()
            .enumerate()
            .map(|(k, grad)| match self.needs(k) {
                true => Some(grad),
                false => {
                    self.release(grad);
                    None
                }
            })
            .collect()
    }

    /// Keeps `kept`'s storage alive as long as `holder`'s ([`Graph::keep_alive_with`]).
    pub fn keep_alive_with(&mut self, holder: Tensor, kept: Tensor) {
        let (holder, kept) = (self.resolve(holder), self.resolve(kept));
        self.graph.keep_alive_with(holder, kept);
    }

    /// Emits a kernel.
    pub fn emit(&mut self, instr: Instr) {
        self.graph.emit(instr);
    }

    /// The slot of `tensor`'s values.
    pub fn slot(&self, tensor: Tensor) -> Slot {
        self.graph.slot(self.resolve(tensor))
    }

    /// How `tensor`'s values are stored.
    pub fn storage(&self, tensor: Tensor) -> Storage {
        self.graph.storage(self.resolve(tensor))
    }

    /// Elements of `tensor`.
    pub fn elements(&self, tensor: Tensor) -> u64 {
        self.graph.elements(self.resolve(tensor))
    }

    /// Samples in the batch.
    pub fn rows(&self) -> u64 {
        self.graph.rows
    }
}

/// The backward of an operation whose input's gradient is its output's, unchanged (a copy
/// such as `reshape`'s, `torch.cat` onto an empty cache, `1.0 + x`): handed on as it is.
#[derive(Debug)]
pub struct PassThrough;

impl Backward for PassThrough {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        vec![grads[0].map(|grad| pass.pass_through(grad))]
    }
}

/// A conversion's backward (autocast's casts; the loss's widening of the logits): the gradient
/// converted back to the source's storage, times `scale`.
#[derive(Debug)]
pub struct CastBackward {
    /// Elements.
    pub elements: u64,
    /// The source's storage.
    pub to: Storage,
    /// What the gradient is multiplied by.
    pub scale: Scale,
}

impl Backward for CastBackward {
    fn backward(&self, pass: &mut Pass<'_>, grads: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        let Some(dy) = grads[0] else {
            return vec![None];
        };
        let dx = pass.gradient(0, self.elements, self.to);
        pass.emit(Instr::Convert {
            from: pass.slot(dy),
            to: pass.slot(dx),
            len: self.elements,
            scale: self.scale,
        });
        vec![Some(dx)]
    }
}
