//! What went wrong talking to the API server, sorted by what a caller can
//! do about it: try again, or fix something.

/// What went wrong talking to the cluster.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClusterError {
    /// The pool (or the wanted address) has nothing to give; the reason.
    #[error("{0}")]
    Full(String),
    /// The API server cannot be reached or did not answer; nothing changed
    /// (or a change was read back and found not made).
    #[error(
        "the Kubernetes API server did not serve the request ({0}); nothing was allocated — try again"
    )]
    Unavailable(String),
    /// The API server refused a request for a reason retrying won't fix.
    #[error("the Kubernetes API server refused: {0}")]
    Refused(String),
}

impl From<crate::kube_api::ClientError> for ClusterError {
    fn from(e: crate::kube_api::ClientError) -> Self {
        ClusterError::Refused(e.0)
    }
}

impl ClusterError {
    /// For a lost answer, the read-back's error is the one to report when
    /// both failed the same way.
    pub(super) fn or(self, other: ClusterError) -> ClusterError {
        match (&self, &other) {
            (ClusterError::Unavailable(_), _) => self,
            _ => other,
        }
    }
}

/// Whether the block as it is now says what became of a failed write:
/// someone else wrote or deleted it (409, 404), or no answer came (the
/// write may have happened), or the server failed (5xx).
pub(super) fn read_back_decides(code: Option<u16>) -> bool {
    match code {
        None | Some(404) | Some(409) => true,
        Some(c) => c >= 500,
    }
}

/// Whether the request never reached the server: the connection could not
/// be made (refused, unreachable), so nothing was written and there is
/// nothing to read back — unlike an answer lost on the way back.
pub(super) fn never_sent(e: &kube::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<hyper_util::client::legacy::Error>()
            .is_some_and(|h| h.is_connect())
        {
            return true;
        }
        source = s.source();
    }
    false
}

pub(super) fn status(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Sorts an error of the client: what retrying may fix (no answer, a 5xx,
/// 429) is `Unavailable`; the rest is a refusal with the server's message.
pub(super) fn classify(e: kube::Error) -> ClusterError {
    match &e {
        kube::Error::Api(s) if s.code >= 500 || s.code == 429 => {
            ClusterError::Unavailable(format!("{} {}", s.code, s.message))
        }
        // A 404 that is not about one object: the resource itself is not
        // served — the CRD is missing, or the server is still starting.
        kube::Error::Api(s) if s.code == 404 && s.reason != "NotFound" => {
            ClusterError::Unavailable(
                "railnet.io resources (railblocks, railpools) are not served: install the chart's CRDs, or wait for the API server to finish starting"
                    .into(),
            )
        }
        kube::Error::Api(s) => ClusterError::Refused(format!("{} {}", s.code, s.message)),
        _ => {
            // The client's own words are terse ("client error
            // (SendRequest)"): the chain of causes says what happened.
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                let more = s.to_string();
                // Wrappers often repeat their cause's words.
                if !text.contains(&more) {
                    text.push_str(": ");
                    text.push_str(&more);
                }
                source = s.source();
            }
            ClusterError::Unavailable(text)
        }
    }
}
