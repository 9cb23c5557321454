//! Leader election over a coordination.k8s.io/v1 `Lease`, as client-go's
//! does: only the leader writes.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{Api, Client, api::PostParams};

/// A Lease-based leader election.
#[derive(Debug)]
pub struct Leader {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The other holder's lease as last seen changing: its
    /// resourceVersion, and when (this process's monotonic clock).
    observed: std::sync::Mutex<Option<(String, std::time::Instant)>>,
}

/// Whether a lease another replica holds has expired, judged as
/// client-go's leader election does: by how long this process has seen it
/// unchanged (`rv` its resourceVersion), never by comparing its renewTime
/// with the local clock — replicas whose clocks disagree by more than the
/// lease would both lead.
fn lease_expired(
    observed: &mut Option<(String, std::time::Instant)>,
    rv: &str,
    now: std::time::Instant,
    held_for: Duration,
) -> bool {
    match observed {
        Some((seen, since)) if seen == rv => now.duration_since(*since) > held_for,
        _ => {
            *observed = Some((rv.to_owned(), now));
            false
        }
    }
}

impl Leader {
    /// Election on Lease `name` in `namespace` as `identity`.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
            observed: std::sync::Mutex::new(None),
        }
    }

    /// Takes or renews the lease if it is free, expired or ours; true if we
    /// lead now. A lost race (409) is simply "not leader".
    pub async fn try_lead(&self) -> Result<bool, kube::Error> {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let secs = i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let ours = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(secs),
            renew_time: Some(now.clone()),
            ..LeaseSpec::default()
        };
        let Some(live) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: kube::api::ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    acquire_time: Some(now),
                    ..ours
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = live.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().unwrap_or_default();
        let held_for = spec
            .lease_duration_seconds
            .map_or(u64::from(secs.unsigned_abs()), |s| {
                u64::from(s.unsigned_abs())
            });
        let expired = holder.is_empty()
            || lease_expired(
                &mut self.observed.lock().unwrap_or_else(|p| p.into_inner()),
                live.metadata
                    .resource_version
                    .as_deref()
                    .unwrap_or_default(),
                std::time::Instant::now(),
                Duration::from_secs(held_for),
            );
        if holder != self.identity && !expired {
            return Ok(false);
        }
        let next_spec = if holder == self.identity {
            LeaseSpec {
                acquire_time: spec.acquire_time.clone(),
                lease_transitions: spec.lease_transitions,
                ..ours
            }
        } else {
            LeaseSpec {
                acquire_time: Some(now),
                lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + 1),
                ..ours
            }
        };
        let mut next = live;
        next.spec = Some(next_spec);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lease another replica holds expires only after this process has
    /// seen it unchanged for its duration: its renewTime, stamped by
    /// another clock, is never compared with ours.
    #[test]
    fn a_lease_expires_by_what_this_process_saw_not_by_its_timestamps() {
        let t0 = std::time::Instant::now();
        let held = Duration::from_secs(15);
        let mut seen = None;
        // First sight, however old its renewTime says it is: not expired.
        assert!(!lease_expired(&mut seen, "100", t0, held));
        assert!(!lease_expired(
            &mut seen,
            "100",
            t0 + Duration::from_secs(15),
            held
        ));
        assert!(lease_expired(
            &mut seen,
            "100",
            t0 + Duration::from_secs(16),
            held
        ));
        // Renewed (a new resourceVersion): the clock starts again.
        assert!(!lease_expired(
            &mut seen,
            "101",
            t0 + Duration::from_secs(20),
            held
        ));
        assert!(!lease_expired(
            &mut seen,
            "101",
            t0 + Duration::from_secs(30),
            held
        ));
        assert!(lease_expired(
            &mut seen,
            "101",
            t0 + Duration::from_secs(36),
            held
        ));
    }
}
