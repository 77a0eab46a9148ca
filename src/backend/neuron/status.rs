//! `NRT_STATUS` (nrt_status.h, SDK 2.28): names for messages, and what each means for the
//! service (reject the batch, retry later, or stop serving).

use std::fmt;

use crate::error::BackendError;

pub const NRT_SUCCESS: u32 = 0;
pub const NRT_FAILURE: u32 = 1;
pub const NRT_INVALID: u32 = 2;
pub const NRT_INVALID_HANDLE: u32 = 3;
pub const NRT_RESOURCE: u32 = 4;
pub const NRT_TIMEOUT: u32 = 5;
pub const NRT_HW_ERROR: u32 = 6;
pub const NRT_QUEUE_FULL: u32 = 7;
pub const NRT_LOAD_NOT_ENOUGH_NC: u32 = 9;
pub const NRT_UNSUPPORTED_NEFF_VERSION: u32 = 10;
pub const NRT_FAIL_HOST_MEM_ALLOC: u32 = 11;
pub const NRT_UNINITIALIZED: u32 = 13;
pub const NRT_CLOSED: u32 = 14;
pub const NRT_QUEUE_EMPTY: u32 = 15;
pub const NRT_EXEC_UNIT_UNRECOVERABLE: u32 = 101;
pub const NRT_EXEC_BAD_INPUT: u32 = 1002;
pub const NRT_EXEC_COMPLETED_WITH_NUM_ERR: u32 = 1003;
pub const NRT_EXEC_COMPLETED_WITH_ERR: u32 = 1004;
pub const NRT_EXEC_NC_BUSY: u32 = 1005;
pub const NRT_EXEC_OOB: u32 = 1006;
pub const NRT_COLL_PENDING: u32 = 1100;
pub const NRT_EXEC_HW_ERR_COLLECTIVES: u32 = 1200;
pub const NRT_EXEC_HW_ERR_HBM_UE: u32 = 1201;
pub const NRT_EXEC_HW_ERR_NC_UE: u32 = 1202;
pub const NRT_EXEC_HW_ERR_DMA_ABORT: u32 = 1203;
pub const NRT_EXEC_SW_NQ_OVERFLOW: u32 = 1204;
pub const NRT_EXEC_HW_ERR_REPAIRABLE_HBM_UE: u32 = 1205;
pub const NRT_NETWORK_PROXY_FAILURE: u32 = 1206;

/// A status libnrt returned. Unknown values (from runtimes newer than the 2.28 header) are
/// kept as numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NrtStatus(pub u32);

impl NrtStatus {
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            NRT_SUCCESS => "NRT_SUCCESS",
            NRT_FAILURE => "NRT_FAILURE",
            NRT_INVALID => "NRT_INVALID",
            NRT_INVALID_HANDLE => "NRT_INVALID_HANDLE",
            NRT_RESOURCE => "NRT_RESOURCE",
            NRT_TIMEOUT => "NRT_TIMEOUT",
            NRT_HW_ERROR => "NRT_HW_ERROR",
            NRT_QUEUE_FULL => "NRT_QUEUE_FULL",
            NRT_LOAD_NOT_ENOUGH_NC => "NRT_LOAD_NOT_ENOUGH_NC",
            NRT_UNSUPPORTED_NEFF_VERSION => "NRT_UNSUPPORTED_NEFF_VERSION",
            NRT_FAIL_HOST_MEM_ALLOC => "NRT_FAIL_HOST_MEM_ALLOC",
            NRT_UNINITIALIZED => "NRT_UNINITIALIZED",
            NRT_CLOSED => "NRT_CLOSED",
            NRT_QUEUE_EMPTY => "NRT_QUEUE_EMPTY",
            NRT_EXEC_UNIT_UNRECOVERABLE => "NRT_EXEC_UNIT_UNRECOVERABLE",
            NRT_EXEC_BAD_INPUT => "NRT_EXEC_BAD_INPUT",
            NRT_EXEC_COMPLETED_WITH_NUM_ERR => "NRT_EXEC_COMPLETED_WITH_NUM_ERR",
            NRT_EXEC_COMPLETED_WITH_ERR => "NRT_EXEC_COMPLETED_WITH_ERR",
            NRT_EXEC_NC_BUSY => "NRT_EXEC_NC_BUSY",
            NRT_EXEC_OOB => "NRT_EXEC_OOB",
            NRT_COLL_PENDING => "NRT_COLL_PENDING",
            NRT_EXEC_HW_ERR_COLLECTIVES => "NRT_EXEC_HW_ERR_COLLECTIVES",
            NRT_EXEC_HW_ERR_HBM_UE => "NRT_EXEC_HW_ERR_HBM_UE",
            NRT_EXEC_HW_ERR_NC_UE => "NRT_EXEC_HW_ERR_NC_UE",
            NRT_EXEC_HW_ERR_DMA_ABORT => "NRT_EXEC_HW_ERR_DMA_ABORT",
            NRT_EXEC_SW_NQ_OVERFLOW => "NRT_EXEC_SW_NQ_OVERFLOW",
            NRT_EXEC_HW_ERR_REPAIRABLE_HBM_UE => "NRT_EXEC_HW_ERR_REPAIRABLE_HBM_UE",
            NRT_NETWORK_PROXY_FAILURE => "NRT_NETWORK_PROXY_FAILURE",
            _ => return None,
        })
    }

    /// `Ok` for `NRT_SUCCESS`, else the status as a call error.
    pub fn check(self, call: &'static str) -> Result<(), CallError> {
        if self.0 == NRT_SUCCESS {
            Ok(())
        } else {
            Err(CallError { call, status: self })
        }
    }

    /// The device or runtime cannot go on: the service must stop serving.
    fn is_fatal(self) -> bool {
        matches!(
            self.0,
            NRT_HW_ERROR | NRT_EXEC_UNIT_UNRECOVERABLE | NRT_UNINITIALIZED | NRT_CLOSED | NRT_EXEC_HW_ERR_COLLECTIVES..=NRT_NETWORK_PROXY_FAILURE
        )
    }

    /// What an operator can do about it, where the runtime documentation says.
    fn hint(self) -> Option<&'static str> {
        Some(match self.0 {
            NRT_HW_ERROR | NRT_EXEC_UNIT_UNRECOVERABLE | NRT_EXEC_HW_ERR_COLLECTIVES..=NRT_EXEC_HW_ERR_REPAIRABLE_HBM_UE => {
                "hardware error: restart the server; AWS's runtime troubleshooting guide recommends replacing the instance if it recurs"
            }
            NRT_LOAD_NOT_ENOUGH_NC | NRT_EXEC_NC_BUSY => {
                "the NeuronCores are held by another process (neuron-ls shows owners); give each process its cores with NEURON_RT_VISIBLE_CORES or NEURON_RT_NUM_CORES"
            }
            NRT_UNSUPPORTED_NEFF_VERSION => {
                "the NEFF was compiled for another target or by an incompatible compiler: recompile with deploy/neuron/compile.py for this instance type"
            }
            NRT_TIMEOUT => "the execution ran past NEURON_RT_EXEC_TIMEOUT (--neuron-exec-timeout-s)",
            _ => return None,
        })
    }
}

impl fmt::Display for NrtStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({})", self.0),
            None => write!(f, "unknown NRT_STATUS {}", self.0),
        }
    }
}

/// A libnrt call that did not return `NRT_SUCCESS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallError {
    pub call: &'static str,
    pub status: NrtStatus,
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} returned {}", self.call, self.status)?;
        match self.status.hint() {
            Some(hint) => write!(f, ": {hint}"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for CallError {}

impl From<CallError> for BackendError {
    /// Bad input fails only its batch; a timeout may pass; a hardware or lifecycle failure
    /// stops the service (health NOT_SERVING) until it is restarted.
    fn from(e: CallError) -> Self {
        let message = e.to_string();
        match e.status.0 {
            NRT_EXEC_BAD_INPUT | NRT_INVALID => BackendError::InvalidInput(message),
            NRT_TIMEOUT => BackendError::Timeout(message),
            _ if e.status.is_fatal() => BackendError::Fatal(message),
            _ => BackendError::Inference(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_status_has_its_header_name() {
        let named = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 13, 14, 15, 101, 1002, 1003, 1004, 1005, 1006, 1100, 1200, 1201, 1202, 1203, 1204, 1205, 1206];
        for code in named {
            let name = NrtStatus(code).name().unwrap_or_else(|| panic!("{code} has no name"));
            assert!(name.starts_with("NRT_"), "{code}: {name}");
        }
        for gap in [8, 12, 16, 100, 1001, 1207] {
            assert_eq!(NrtStatus(gap).name(), None, "{gap}");
        }
        assert_eq!(NrtStatus(5).to_string(), "NRT_TIMEOUT (5)");
        assert_eq!(NrtStatus(4242).to_string(), "unknown NRT_STATUS 4242");
    }

    #[test]
    fn statuses_map_to_what_the_service_does() {
        let kind = |code| match BackendError::from(CallError { call: "nrt_execute", status: NrtStatus(code) }) {
            BackendError::InvalidInput(_) => "invalid",
            BackendError::Timeout(_) => "timeout",
            BackendError::Fatal(_) => "fatal",
            BackendError::Inference(_) => "inference",
        };
        for (code, want) in [
            (NRT_EXEC_BAD_INPUT, "invalid"),
            (NRT_INVALID, "invalid"),
            (NRT_TIMEOUT, "timeout"),
            (NRT_HW_ERROR, "fatal"),
            (NRT_EXEC_UNIT_UNRECOVERABLE, "fatal"),
            (NRT_UNINITIALIZED, "fatal"),
            (NRT_CLOSED, "fatal"),
            (NRT_FAILURE, "inference"),
            (NRT_EXEC_COMPLETED_WITH_NUM_ERR, "inference"),
            (NRT_EXEC_NC_BUSY, "inference"),
            (9999, "inference"),
        ] {
            assert_eq!(kind(code), want, "{}", NrtStatus(code));
        }
        for code in NRT_EXEC_HW_ERR_COLLECTIVES..=NRT_NETWORK_PROXY_FAILURE {
            assert_eq!(kind(code), "fatal", "{}", NrtStatus(code));
        }
    }

    #[test]
    fn messages_name_the_call_the_status_and_the_fix() {
        let e = CallError { call: "nrt_execute", status: NrtStatus(NRT_EXEC_HW_ERR_HBM_UE) };
        let text = BackendError::from(e).to_string();
        assert!(text.contains("nrt_execute returned NRT_EXEC_HW_ERR_HBM_UE (1201)"), "{text}");
        assert!(text.contains("replacing the instance"), "{text}");
    }
}
