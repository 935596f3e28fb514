//! What the service and a probe worker say to each other: one JSON object per line, requests on
//! the worker's standard input, events on its standard output.

use std::io::{BufRead, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use headroom_engine::device::DeviceInfo;
use headroom_engine::result::Probe;
use headroom_engine::search::TuneError;
use headroom_engine::TuneResult;

/// From the service to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Run the search for this job (validated by the service; the worker validates again).
    Tune {
        /// The job, as the service normalised it.
        job: serde_json::Value,
    },
    /// Stop the running search after its current probe.
    Cancel,
}

/// From a worker to the service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// The device is open: the first event of every worker.
    Ready {
        /// The device the worker opened.
        info: DeviceInfo,
        /// Why `auto` opened the host, when it did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fallback_reason: Option<String>,
    },
    /// The device could not be opened; the worker exits.
    OpenFailed {
        /// Why, in the driver's words.
        reason: String,
    },
    /// A probe begins (the service's watchdog times it).
    ProbeStarted {
        /// Its batch size.
        batch_size: u64,
    },
    /// A probe ended.
    Probe(Probe),
    /// The search ended; the worker takes the next job, or exits after a device fault.
    Ended {
        /// The answer, or why there is none.
        outcome: Box<Result<TuneResult, TuneError>>,
        /// The device's identity and memory now.
        info: DeviceInfo,
    },
}

/// Writes `message` as one line and flushes it.
pub fn send<W: Write, M: Serialize>(writer: &mut W, message: &M) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message)?;
    line.push(b'\n');
    writer.write_all(&line)?;
    writer.flush()
}

/// The most of an unreadable line an error quotes.
const QUOTED: usize = 200;

/// Reads the next message; `None` at the end of the stream. A line that is not a message is an
/// [`std::io::ErrorKind::InvalidData`] error quoting it, and the stream can be read on.
pub fn receive<R: BufRead, M: DeserializeOwned>(reader: &mut R) -> std::io::Result<Option<M>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    serde_json::from_str(&line).map(Some).map_err(|e| {
        let line = line.trim_end();
        let quoted: String = line.chars().take(QUOTED).collect();
        let more = if quoted.len() < line.len() { "..." } else { "" };
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{e}: {quoted:?}{more}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use headroom_engine::device::DeviceKind;
    use headroom_engine::result::Outcome;

    #[test]
    fn messages_cross_a_stream_one_line_each() {
        let info = DeviceInfo {
            kind: DeviceKind::Host,
            index: 0,
            name: "host\nwith a newline".into(),
            uuid: None,
            total_bytes: 1 << 20,
            free_bytes: 1 << 19,
        };
        let events = vec![
            Event::Ready {
                info: info.clone(),
                fallback_reason: Some("no CUDA device found".into()),
            },
            Event::ProbeStarted { batch_size: 16 },
            Event::Probe(Probe {
                batch_size: 16,
                outcome: Outcome::Fit,
                step_seconds: 0.25,
                step_seconds_spread: 0.1,
                timed_steps: 3,
                samples_per_second: 64.0,
                device_bytes: 4096,
            }),
            Event::Ended {
                outcome: Box::new(Err(TuneError::Fault {
                    batch_size: 32,
                    message: "CUDA_ERROR_ILLEGAL_ADDRESS".into(),
                })),
                info,
            },
        ];
        let mut stream = Vec::new();
        for event in &events {
            send(&mut stream, event).unwrap();
        }
        assert_eq!(stream.iter().filter(|b| **b == b'\n').count(), events.len());
        let mut reader = std::io::Cursor::new(stream);
        for event in &events {
            assert_eq!(
                receive::<_, Event>(&mut reader).unwrap().as_ref(),
                Some(event)
            );
        }
        assert_eq!(receive::<_, Event>(&mut reader).unwrap(), None);
        // A line that is no message is an error quoting it, and the next line is read on.
        let mut reader = std::io::Cursor::new(b"{\"tune\"\n\"cancel\"\n".to_vec());
        let garbage = receive::<_, Request>(&mut reader).unwrap_err();
        assert_eq!(garbage.kind(), std::io::ErrorKind::InvalidData);
        assert!(garbage.to_string().contains(r#""{\"tune\"""#), "{garbage}");
        assert_eq!(
            receive::<_, Request>(&mut reader).unwrap(),
            Some(Request::Cancel)
        );
    }
}
