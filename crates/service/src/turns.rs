//! One tune of a job at a time across every node sharing the store. Before a worker tunes a
//! job it claims the job's cache key ([`crate::store::claim`]); a node that finds the claim held
//! waits for the holder's answer and returns it, and takes the claim itself if the holder frees
//! it without one (it failed, or died). The holder's result is in the store before its claim
//! frees, so a waiting node always finds it.

use std::sync::Arc;
use std::time::Duration;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::runtime::Handle;

use crate::answer::TuneAnswer;
use crate::jobs::TuneJob;
use crate::store::claim::Claim;
use crate::store::journal::{Direction, Journal, StoreHealth};
use crate::store::Store;

/// How often a node waiting for another's tune looks for its answer.
const POLL_EVERY: Duration = Duration::from_millis(250);
/// How long the holder waits for its result to reach the store before freeing its claim.
const STORE_WAIT: Duration = Duration::from_secs(10);

/// What a worker does with a job.
pub enum Turn {
    /// Tune it, holding the claim (none when the store cannot grant one now: the node tunes
    /// on its own rather than wait for a store that is down).
    Tune(Option<Claim>),
    /// Another node tuned it while this one waited: its answer.
    Answered(Box<TuneAnswer>),
    /// The job was cancelled, or the service is stopping, while it waited.
    Stopped,
}

/// The claims of this node's workers, taken on the service's runtime from their threads.
pub struct Turns {
    store: Arc<dyn Store>,
    journal: Journal,
    health: Arc<StoreHealth>,
    runtime: Handle,
}

impl Turns {
    /// Claims over `store`, whose results reach it through `journal` and whose failures
    /// `health` knows; async work runs on `runtime`.
    pub fn new(
        store: Arc<dyn Store>,
        journal: Journal,
        health: Arc<StoreHealth>,
        runtime: Handle,
    ) -> Turns {
        Turns {
            store,
            journal,
            health,
            runtime,
        }
    }

    /// Blocks the calling worker thread until `job` may be tuned here, or another node's answer
    /// to it has arrived.
    pub fn wait_for_turn(&self, job: &TuneJob) -> Turn {
        self.runtime.block_on(async {
            let mut waited = false;
            loop {
                if job.is_cancel_requested() {
                    return Turn::Stopped;
                }
                if self.health.failing(Direction::Write) {
                    return Turn::Tune(None);
                }
                let claim = match self.store.claim(&job.cache_key).await {
                    Ok(claim) => claim,
                    Err(error) => {
                        tracing::debug!(job = %job.id, %error, "no claim from the store; tuning without one");
                        return Turn::Tune(None);
                    }
                };
                // A store no other node shares has no other node's answer to look for.
                if claim.as_ref().is_some_and(Claim::is_local) {
                    return Turn::Tune(claim);
                }
                // Whether holding the claim or not: an answer measured since the job came
                // is this job's answer (the claim's holder may have just finished).
                if let Some(answer) = self.answer_since(job).await {
                    if let Some(claim) = claim {
                        claim.release().await;
                    }
                    tracing::info!(job = %job.id, measured_on = answer.measured_on.as_deref().unwrap_or(""), "answered by another node's tune of the same job");
                    return Turn::Answered(Box::new(answer));
                }
                if let Some(claim) = claim {
                    return Turn::Tune(Some(claim));
                }
                if !waited {
                    tracing::info!(job = %job.id, "another node is tuning the same job: waiting for its answer");
                    waited = true;
                }
                tokio::time::sleep(POLL_EVERY).await;
            }
        })
    }

    /// After a tune: frees `claim` once what the tune wrote (its result) is in the store.
    pub fn release(&self, claim: Option<Claim>) {
        if let Some(claim) = claim {
            self.runtime.block_on(async {
                self.journal.flush(STORE_WAIT).await;
                claim.release().await;
            });
        }
    }

    /// A result for `job`'s key measured after the job was created, marked as reused.
    async fn answer_since(&self, job: &TuneJob) -> Option<TuneAnswer> {
        let created = OffsetDateTime::parse(&job.document().created_at, &Rfc3339).ok()?;
        let age = (OffsetDateTime::now_utc() - created).unsigned_abs();
        let found = self.store.result(&job.cache_key, age).await.ok()??;
        Some(TuneAnswer {
            cached: true,
            ..found
        })
    }
}
