//! Choosing and opening a device from `auto`, `host`, `cuda` or `cuda:N`.

use std::str::FromStr;

use crate::cuda::{self, CudaDevice, CudaError};
use crate::host::HostDevice;
use headroom_engine::device::Device;

/// Which device a job asks for; written `auto`, `host`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceSpec {
    /// CUDA device 0 when CUDA is present, else the host.
    #[default]
    Auto,
    /// The CPU reference.
    Host,
    /// CUDA device with this index.
    Cuda(u32),
}

/// A device name that is none of `auto`, `host`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown device `{0}`; use auto, host, cuda or cuda:N")]
pub struct UnknownDevice(pub String);

impl FromStr for DeviceSpec {
    type Err = UnknownDevice;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(DeviceSpec::Auto),
            "host" => Ok(DeviceSpec::Host),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => text
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| UnknownDevice(text.into())),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Host => f.write_str("host"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// An opened device, and a note for the user when `auto` fell back to the host.
pub struct Opened {
    /// The device to probe.
    pub device: Box<dyn Device>,
    /// Why `auto` chose the host, if it did.
    pub fallback_reason: Option<String>,
}

/// Opens the device `spec` names; the host gets `host_budget_bytes`. Only a named GPU fails:
/// `auto` falls back to the host, and says why.
pub fn open(spec: DeviceSpec, host_budget_bytes: u64) -> Result<Opened, CudaError> {
    let host = |reason| Opened {
        device: Box::new(HostDevice::new(host_budget_bytes)),
        fallback_reason: reason,
    };
    match spec {
        DeviceSpec::Host => Ok(host(None)),
        DeviceSpec::Cuda(index) => Ok(Opened {
            device: Box::new(CudaDevice::open(index)?),
            fallback_reason: None,
        }),
        DeviceSpec::Auto => match cuda::device_count() {
            Ok(0) => Ok(host(Some("no CUDA device found".into()))),
            Ok(_) => match CudaDevice::open(0) {
                Ok(device) => Ok(Opened {
                    device: Box::new(device),
                    fallback_reason: None,
                }),
                Err(e) => Ok(host(Some(format!(
                    "CUDA device 0 could not be opened: {e}"
                )))),
            },
            Err(e) => Ok(host(Some(e.to_string()))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        for text in ["auto", "host", "cuda:0", "cuda:3"] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap().to_string(), text);
        }
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x", ""] {
            assert!(bad.parse::<DeviceSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn specs_read_and_write_as_json_strings() {
        let specs: Vec<DeviceSpec> = serde_json::from_str(r#"["auto", "host", "cuda:2"]"#).unwrap();
        assert_eq!(
            specs,
            [DeviceSpec::Auto, DeviceSpec::Host, DeviceSpec::Cuda(2)]
        );
        assert_eq!(
            serde_json::to_string(&specs).unwrap(),
            r#"["auto","host","cuda:2"]"#
        );
        assert!(serde_json::from_str::<DeviceSpec>(r#""gpu0""#).is_err());
    }

    #[test]
    fn host_always_opens() {
        let opened = open(DeviceSpec::Host, 1 << 20).unwrap();
        assert_eq!(opened.device.info().total_bytes, 1 << 20);
        assert!(opened.fallback_reason.is_none());
    }
}
