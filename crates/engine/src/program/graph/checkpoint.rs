//! Activation checkpointing as `torch.utils.checkpoint(fn, x, use_reentrant=False)` runs it.
//!
//! Forward: the region's input is saved by the checkpoint's frame, its nodes are recorded as
//! always, but what each saves is packed away (a holder, no reference), so the region's
//! activations go as soon as the forward lets them go. Backward: the first node of the region
//! that unpacks a saved tensor runs the region's forward again on the saved input (autocast as
//! it was, a fresh cache; dropout draws the same masks), and each tensor the recomputation saves
//! goes, in order, to the node that packed the matching one; the recomputation stops once the
//! last is saved (early stop: nothing after it is allocated or run, and an operation that saves
//! only its inputs, which autograd saves before running it, does not run). A recomputed tensor
//! goes when the computation of the node it went to returns, before autograd's engine sums a
//! broadcast input's gradient ([`super::Pass::applied`]); the frame, and with it the input and
//! what the model's forward shared with the region (rotary tables, an eager causal mask: the
//! arguments Hugging Face passes each checkpointed layer), goes when the last node that packed
//! anything has run.

use super::{Graph, Tensor};
use crate::program::framework::Framework;
use crate::program::instr::{Instr, Slot};

/// How [`Graph::record`] treats what a node saves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Saving {
    /// Kept by the node until it has run.
    Kept,
    /// Packed away: the forward of checkpointed region `.0`.
    Packed(usize),
    /// Handed to the nodes that packed it: the recomputation of `region`, the `next`-th packed
    /// tensor next.
    Recomputing { region: usize, next: usize },
}

/// A checkpointed region's forward, run again in backward.
pub trait Recompute: std::fmt::Debug {
    /// Records the region's forward over `input` (a reference the caller keeps) and returns
    /// its output (a reference the caller owns).
    fn recompute(&self, graph: &mut Graph, input: Tensor) -> Tensor;
}

/// A checkpointed region being recorded, from [`Graph::begin_checkpoint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region(usize);

/// What the step keeps of a checkpointed region.
#[derive(Debug)]
pub(super) struct RegionEntry {
    /// The job's field of the checkpoint, for refusals.
    field: String,
    /// Its forward, until the recomputation runs it.
    recompute: Option<Box<dyn Recompute>>,
    /// The input its frame saved.
    input: Tensor,
    /// What the model's forward shared with it, by name, and the frame holds.
    shared: Vec<(String, Vec<Tensor>)>,
    /// Names of what it read of the model's shared tensors.
    reads: Vec<String>,
    /// Whether its forward ran under autocast.
    autocast: bool,
    /// Each tensor its nodes packed, in order, with the node.
    packed: Vec<(usize, Tensor)>,
    /// Nodes whose packed tensors are yet to be unpacked: the frame lives until none is left.
    holders: usize,
    recomputed: bool,
}

impl Graph {
    /// Starts a checkpointed region over `input` at `field` (`model.layers[3].checkpoint.layers`):
    /// its frame saves the input, and what its nodes save is packed away until
    /// [`Graph::end_checkpoint`]. headroom's own step, which frees nothing, is refused.
    pub fn begin_checkpoint(&mut self, input: Tensor, field: &str) -> Region {
        if self.framework() == Framework::Headroom {
            self.refuse(
                field.to_string(),
                "activation checkpointing frees a block's activations between forward and \
                 backward, and headroom's own step frees nothing: use the \"pytorch\" framework"
                    .to_string(),
            );
        }
        self.retain(input);
        self.regions.push(RegionEntry {
            field: field.to_string(),
            recompute: None,
            input,
            shared: Vec::new(),
            reads: Vec::new(),
            autocast: self.autocast.is_some(),
            packed: Vec::new(),
            holders: 0,
            recomputed: false,
        });
        let region = self.regions.len() - 1;
        self.saving = Saving::Packed(region);
        Region(region)
    }

    /// Ends `region`'s forward: `recompute` runs it again when backward first needs what it
    /// saved. A region that packed nothing lets its frame go now.
    pub fn end_checkpoint(&mut self, region: Region, recompute: impl Recompute + 'static) {
        self.saving = Saving::Kept;
        let reads = std::mem::take(&mut self.regions[region.0].reads);
        let shared: Vec<(String, Vec<Tensor>)> = self
            .shared
            .iter()
            .filter(|(name, _)| reads.contains(name))
            .cloned()
            .collect();
        for &tensor in shared.iter().flat_map(|(_, t)| t) {
            self.retain(tensor);
        }
        let entry = &mut self.regions[region.0];
        entry.shared = shared;
        entry.recompute = Some(Box::new(recompute));
        if entry.holders == 0 {
            self.let_frame_go(region.0);
        }
    }

    /// Notes that the region being recorded read the model's shared tensors `name`.
    pub(super) fn note_shared(&mut self, name: &str) {
        if let Saving::Packed(region) = self.saving {
            let reads = &mut self.regions[region].reads;
            if !reads.iter().any(|n| n == name) {
                reads.push(name.to_string());
            }
        }
    }

    /// Packs `saved` of `node`, recorded inside `region`.
    pub(super) fn pack(&mut self, region: usize, node: usize, saved: &[Tensor]) {
        let entry = &mut self.regions[region];
        entry.packed.extend(saved.iter().map(|&t| (node, t)));
        if !saved.is_empty() {
            entry.holders += 1;
        }
    }

    /// During a recomputation: each of `saved` goes to the node that packed the next tensor,
    /// kept by it and read in that tensor's place. After the last, the recomputation stops;
    /// if that one is an input of the operation (saved before it runs, as autograd saves
    /// inputs) and not one of its `outputs`, the operation never ran.
    pub(super) fn unpack(&mut self, saved: &[Tensor], outputs: &[Tensor]) {
        let Saving::Recomputing { region, next } = self.saving else {
            return;
        };
        if self.code.stopped {
            return;
        }
        let mut next = next;
        for &tensor in saved {
            let Some(&(node, packed)) = self.regions[region].packed.get(next) else {
                break;
            };
            next += 1;
            self.retain(tensor);
            self.nodes[node].saved.push(tensor);
            self.nodes[node].substitutes.push((packed, tensor));
        }
        self.saving = Saving::Recomputing { region, next };
        if next == self.regions[region].packed.len() {
            self.never_ran(saved, outputs);
            self.code.stopped = true;
        }
    }

    /// Takes back what the operation that made `outputs` allocated and ran, from the first of
    /// its outputs' allocations on, when everything it `saved` was there before (its inputs,
    /// saved before it runs): autograd stopped the recomputation before it ran. Frees of what
    /// was allocated before stay. An operation that saved what it made (its output, pooling's
    /// indices) ran; so did one whose outputs were allocated before the recomputation began
    /// (in place).
    fn never_ran(&mut self, saved: &[Tensor], outputs: &[Tensor]) {
        let made: Vec<Slot> = outputs.iter().map(|&t| self.slot(t)).collect();
        let kept: Vec<Slot> = saved.iter().map(|&t| self.slot(t)).collect();
        let began = self.recomputation_began;
        let Some(first) = self.code.step[began..]
            .iter()
            .position(|instr| allocates(instr, &made))
        else {
            return;
        };
        let first = began + first;
        if self.code.step[first..]
            .iter()
            .any(|instr| allocates(instr, &kept))
        {
            return;
        }
        let mut undone: Vec<Slot> = Vec::new();
        for instr in self.code.step.split_off(first) {
            match instr {
                Instr::Alloc { slot, .. } => undone.push(slot),
                Instr::Free(slot) if !undone.contains(&slot) => self.code.step.push(instr),
                _ => {}
            }
        }
        for storage in &mut self.storages {
            if undone.contains(&storage.slot) {
                storage.phantom = true;
            }
        }
    }

    /// Before node `n` runs: if it unpacks what its region packed and the region has not been
    /// recomputed, recomputes it.
    pub(super) fn unpacking(&mut self, n: usize) {
        let Some(region) = self.nodes[n].region else {
            return;
        };
        if self.nodes[n].packed.is_empty() || self.regions[region].recomputed {
            return;
        }
        self.regions[region].recomputed = true;
        let recompute = self.regions[region]
            .recompute
            .take()
            .expect("a region's forward ended before backward");
        let shared_before = self.shared.len();
        self.shared
            .extend(self.regions[region].shared.iter().cloned());
        let outer_autocast = self.autocast.take();
        if self.regions[region].autocast {
            self.begin_autocast();
        }
        self.saving = Saving::Recomputing { region, next: 0 };
        self.recomputation_began = self.code.step.len();
        let input = self.regions[region].input;
        let output = recompute.recompute(self, input);
        self.release(output);
        self.end_autocast();
        self.autocast = outer_autocast;
        // What the recomputation made of the model's shared tensors itself is let go; the
        // frame's own stay with the frame.
        let lent = self.regions[region].shared.len();
        let made: Vec<Tensor> = self
            .shared
            .drain(shared_before..)
            .skip(lent)
            .flat_map(|(_, t)| t)
            .collect();
        for tensor in made {
            self.release(tensor);
        }
        let Saving::Recomputing { next, .. } = self.saving else {
            unreachable!("only a recomputation ends here");
        };
        self.saving = Saving::Kept;
        self.code.stopped = false;
        if next != self.regions[region].packed.len() {
            let field = self.regions[region].field.clone();
            self.refuse(
                field,
                format!(
                    "its recomputation saved {next} tensors where its forward saved {}, so \
                     headroom cannot tell which node reads which (a weight cast by autocast \
                     before the region, then read inside it, does this): checkpoint a region \
                     that holds every use of its weights",
                    self.regions[region].packed.len()
                ),
            );
        }
    }

    /// What node `n` of a region unpacked goes, before the node ends ([`super::Pass::applied`]).
    pub(super) fn drop_unpacked(&mut self, n: usize) {
        if self.nodes[n].region.is_none() {
            return;
        }
        for tensor in std::mem::take(&mut self.nodes[n].saved) {
            self.release(tensor);
        }
    }

    /// After node `n` has run: the last node of a region to unpack lets its frame go.
    pub(super) fn unpacked(&mut self, n: usize) {
        let Some(region) = self.nodes[n].region else {
            return;
        };
        if self.nodes[n].packed.is_empty() {
            return;
        }
        self.regions[region].holders -= 1;
        if self.regions[region].holders == 0 {
            self.let_frame_go(region);
        }
    }

    /// `region`'s frame goes: its saved input and what it held of the model's shared tensors.
    fn let_frame_go(&mut self, region: usize) {
        let input = self.regions[region].input;
        let shared = std::mem::take(&mut self.regions[region].shared);
        self.release(input);
        for tensor in shared.into_iter().flat_map(|(_, t)| t) {
            self.release(tensor);
        }
    }
}

/// Whether `instr` allocates one of `slots`.
fn allocates(instr: &Instr, slots: &[Slot]) -> bool {
    matches!(instr, Instr::Alloc { slot, .. } if slots.contains(slot))
}
