//! The host's memory: a [`Ledger`] of the bytes charged against the budget, the buffers charged
//! to it ([`HostBuffer`]), and the freed buffers it keeps for reuse, as a caching allocator does.
//!
//! Every buffer is charged before it is allocated; a charge past the budget is
//! [`DeviceError::OutOfMemory`]. A freed buffer is kept (uncharged) while what is charged and
//! what is kept fit the budget together, and handed out zeroed to the next buffer of its type
//! and length: a step allocates the same buffers every time, and reusing them spares the system
//! zeroing fresh pages on every step. The process never holds more than the budget in buffers.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use headroom_engine::device::DeviceError;
use rayon::prelude::*;

/// What a host buffer may hold: plain values that any thread may free.
pub trait Plain: Copy + Default + Send + Sync + 'static {}

impl<T: Copy + Default + Send + Sync + 'static> Plain for T {}

/// Freed buffers by type and length, and their bytes.
#[derive(Debug, Default)]
struct Kept {
    buffers: HashMap<(TypeId, usize), Vec<Box<dyn Any + Send>>>,
    bytes: u64,
}

/// Bytes charged against a budget, the most charged at once since the peak restarted, and the
/// freed buffers kept for reuse.
#[derive(Debug)]
pub struct Ledger {
    budget: u64,
    used: AtomicU64,
    peak: AtomicU64,
    kept: Mutex<Kept>,
}

impl Ledger {
    pub(super) fn new(budget: u64) -> Ledger {
        Ledger {
            budget,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            kept: Mutex::default(),
        }
    }

    fn charge(&self, bytes: u64) -> Result<(), DeviceError> {
        let before = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(bytes)
                    .filter(|&total| total <= self.budget)
            })
            .map_err(|used| DeviceError::OutOfMemory {
                requested_bytes: bytes,
                free_bytes: self.budget.saturating_sub(used),
            })?;
        self.peak.fetch_max(before + bytes, Ordering::SeqCst);
        Ok(())
    }

    /// Starts the peak anew from what is charged now, which it returns.
    pub(super) fn restart_peak(&self) -> u64 {
        let used = self.used();
        self.peak.store(used, Ordering::SeqCst);
        used
    }

    pub(super) fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }

    fn release(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::SeqCst);
    }

    pub(super) fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    pub(super) fn budget(&self) -> u64 {
        self.budget
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A kept buffer of `len` values of `T`, if there is one.
    fn reuse<T: Plain>(&self, len: usize) -> Option<Vec<T>> {
        let mut kept = self.kept();
        let buffer = kept.buffers.get_mut(&(TypeId::of::<T>(), len))?.pop()?;
        kept.bytes -= bytes_of::<T>(len);
        buffer.downcast::<Vec<T>>().ok().map(|buffer| *buffer)
    }

    /// Keeps `data` for reuse if it fits the budget beside what is charged and kept.
    fn keep<T: Plain>(&self, data: Vec<T>) {
        let bytes = bytes_of::<T>(data.len());
        let mut kept = self.kept();
        if self.used() + kept.bytes + bytes <= self.budget {
            kept.bytes += bytes;
            let key = (TypeId::of::<T>(), data.len());
            kept.buffers.entry(key).or_default().push(Box::new(data));
        }
    }

    /// Frees every kept buffer if what is charged and kept no longer fit the budget together.
    fn make_room(&self) {
        let mut kept = self.kept();
        if self.used() + kept.bytes > self.budget {
            *kept = Kept::default();
        }
    }
}

fn bytes_of<T>(len: usize) -> u64 {
    (len * std::mem::size_of::<T>()) as u64
}

/// A zeroed host buffer whose bytes stay charged to the ledger until it is dropped.
#[derive(Debug)]
pub struct HostBuffer<T: Plain> {
    data: Vec<T>,
    ledger: Arc<Ledger>,
}

impl<T: Plain> HostBuffer<T> {
    pub(super) fn zeroed(ledger: &Arc<Ledger>, len: u64) -> Result<Self, DeviceError> {
        let bytes =
            len.checked_mul(std::mem::size_of::<T>() as u64)
                .ok_or(DeviceError::OutOfMemory {
                    requested_bytes: u64::MAX,
                    free_bytes: ledger.budget.saturating_sub(ledger.used()),
                })?;
        ledger.charge(bytes)?;
        let refused = DeviceError::OutOfMemory {
            requested_bytes: bytes,
            free_bytes: ledger.budget.saturating_sub(ledger.used()),
        };
        let Ok(len) = usize::try_from(len) else {
            ledger.release(bytes);
            return Err(refused);
        };
        let data = match ledger.reuse::<T>(len) {
            Some(mut data) => {
                data.par_chunks_mut(super::TASK)
                    .for_each(|part| part.fill(T::default()));
                data
            }
            None => {
                ledger.make_room();
                let mut data = Vec::new();
                if data.try_reserve_exact(len).is_err() {
                    ledger.release(bytes);
                    return Err(refused);
                }
                data.resize(len, T::default());
                data
            }
        };
        Ok(HostBuffer {
            data,
            ledger: Arc::clone(ledger),
        })
    }

    pub(super) fn copied(ledger: &Arc<Ledger>, values: &[T]) -> Result<Self, DeviceError> {
        let mut buffer = HostBuffer::zeroed(ledger, values.len() as u64)?;
        buffer.copy_from_slice(values);
        Ok(buffer)
    }
}

impl<T: Plain> Drop for HostBuffer<T> {
    fn drop(&mut self) {
        self.ledger.release(bytes_of::<T>(self.data.len()));
        self.ledger.keep(std::mem::take(&mut self.data));
    }
}

impl<T: Plain> Deref for HostBuffer<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.data
    }
}

impl<T: Plain> DerefMut for HostBuffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_buffers_come_back_zeroed_and_never_past_the_budget() {
        let ledger = Arc::new(Ledger::new(1024));
        let mut first = HostBuffer::<f32>::zeroed(&ledger, 64).unwrap();
        first.fill(7.0);
        let place = first.as_ptr();
        drop(first);
        assert_eq!(ledger.used(), 0);
        let again = HostBuffer::<f32>::zeroed(&ledger, 64).unwrap();
        assert_eq!(again.as_ptr(), place, "the freed buffer is reused");
        assert!(again.iter().all(|&v| v == 0.0));
        // Another type or length never takes it; charged and kept stay within the budget.
        drop(again);
        let other = HostBuffer::<u32>::zeroed(&ledger, 200).unwrap();
        assert!(other.iter().all(|&v| v == 0));
        assert!(ledger.used() + ledger.kept().bytes <= 1024);
        assert!(
            HostBuffer::<f32>::zeroed(&ledger, 100).is_err(),
            "800 + 400 > 1024"
        );
    }
}
