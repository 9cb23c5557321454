//! Mode chained: an earlier plugin in the chain (sriov-cni, ib-sriov-cni)
//! made the interface; railnet adds its addresses, routes and program and
//! takes only those away again.

use super::{LinkCx, RailLink, Taken};
use crate::{api::ApiError, netconf::Mode};

/// The earlier plugin's interface.
pub struct Chained;

impl RailLink for Chained {
    fn mode(&self) -> Mode {
        Mode::Chained
    }

    fn owns_interface(&self) -> bool {
        false
    }

    /// It is there already, with whatever MTU its plugin set (0: the pod
    /// side reads it).
    fn create(&self, _cx: &LinkCx<'_>, _taken: Option<&Taken>) -> Result<u32, ApiError> {
        Ok(0)
    }
}
