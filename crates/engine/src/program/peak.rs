//! The most memory a program holds, at which instruction, and in which of the four places.

use super::instr::{Instr, Moment};
use super::Program;
use crate::memory::{Allocator, Buffer, MemoryBreakdown};

/// The most memory a program holds at one instruction, and what holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peak {
    /// Bytes, each buffer rounded as the allocator rounds it.
    pub bytes: u64,
    /// The exact bytes of each part at that instruction.
    pub memory: MemoryBreakdown,
    /// The moment of the step it falls in.
    pub moment: Moment,
    /// Which allocation it follows (its place among the program's allocations, setup first),
    /// for comparing programs of one plan at other batch sizes.
    pub allocation: usize,
}

impl Program {
    /// The program's highest memory: setup, then one step, each buffer rounded by `allocator`.
    /// `None` past `u64`.
    pub fn peak(&self, allocator: Allocator) -> Option<Peak> {
        self.peak_where(allocator, |_| true)
    }

    /// The memory held right after the `allocation`-th allocation (counted from 0), exactly.
    pub fn memory_at(&self, allocation: usize) -> Option<MemoryBreakdown> {
        self.peak_where(Allocator::Exact, |n| n == allocation)
            .map(|peak| peak.memory)
    }

    /// The highest memory among the instants (the allocations' numbers) that `counts` accepts.
    fn peak_where(&self, allocator: Allocator, counts: impl Fn(usize) -> bool) -> Option<Peak> {
        let mut live: Vec<Option<(Buffer, u64)>> = vec![None; self.slots];
        let mut memory = MemoryBreakdown::default();
        let mut bytes = 0u64;
        let mut moment = Moment::Setup;
        let mut allocations = 0usize;
        let mut best: Option<Peak> = None;
        for instr in self.setup.iter().chain(&self.step) {
            match instr {
                Instr::Enter(next) => moment = *next,
                Instr::Alloc { slot, buffer } => {
                    let exact = buffer.bytes()?;
                    let charged = allocator.charge(exact)?;
                    *memory.part_mut(buffer.part) = memory.part(buffer.part).checked_add(exact)?;
                    memory.total = memory.total.checked_add(exact)?;
                    bytes = bytes.checked_add(charged)?;
                    live[slot.0] = Some((*buffer, charged));
                    if counts(allocations) && best.is_none_or(|b| bytes > b.bytes) {
                        best = Some(Peak {
                            bytes,
                            memory,
                            moment,
                            allocation: allocations,
                        });
                    }
                    allocations += 1;
                }
                Instr::Free(slot) => {
                    let (buffer, charged) = live[slot.0]
                        .take()
                        .expect("a program frees only what it allocated");
                    let exact = buffer.bytes()?;
                    *memory.part_mut(buffer.part) -= exact;
                    memory.total -= exact;
                    bytes -= charged;
                }
                _ => {}
            }
        }
        best
    }
}
