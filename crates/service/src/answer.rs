//! A tune's answer as the service gives it: the engine's result, and where, when and whether
//! it was measured for this request.

use std::ops::Not;

use serde::{Deserialize, Serialize};

use headroom_engine::result::TuneResult;

/// The engine's [`TuneResult`] with the service's facts about it beside its members.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuneAnswer {
    /// What the search found.
    #[serde(flatten)]
    pub result: TuneResult,
    /// True when the service answered from its cache instead of probing.
    #[serde(default, skip_serializing_if = "Not::not")]
    pub cached: bool,
    /// Where the service measured it: its node and device, e.g. `node-17/cuda:0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_on: Option<String>,
    /// When the service measured it (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_at: Option<String>,
}

impl std::ops::Deref for TuneAnswer {
    type Target = TuneResult;

    fn deref(&self) -> &TuneResult {
        &self.result
    }
}
