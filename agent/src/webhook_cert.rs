//! The webhook's serving certificate, owned by the controller: it creates a
//! CA and a certificate for the webhook Service in a Secret once (or takes
//! the one there), writes that CA into the MutatingWebhookConfiguration's
//! `caBundle`, and serves whatever the Secret holds, re-read every
//! [`REFRESH`]. A certificate rendered by Helm changes at every `helm
//! upgrade` (or `helm template`) while a running controller keeps serving
//! the old one — every pod creation then fails until it restarts.
//!
//! The Secret is owned (ownerReference) by the webhook configuration, so it
//! goes when the chart's webhook goes.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use base64::Engine;
use k8s_openapi::{
    ByteString,
    api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Secret},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Client, Resource,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio_rustls::rustls::{
    self,
    crypto::ring::sign::any_supported_type,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// How often the Secret and the caBundle are checked again.
pub const REFRESH: Duration = Duration::from_secs(20);

/// Where the certificate lives and what it must name.
#[derive(Debug, Clone)]
pub struct CertSpec {
    /// Namespace of the Secret and the Service.
    pub namespace: String,
    /// The Secret's name.
    pub secret: String,
    /// The webhook Service's name (the certificate names
    /// `<service>.<namespace>.svc` and its shorter forms).
    pub service: String,
    /// The MutatingWebhookConfiguration whose caBundle trusts the CA.
    pub webhook_config: String,
}

/// A CA and a serving certificate, PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pems {
    /// The CA certificate (the caBundle).
    pub ca: String,
    /// The serving certificate.
    pub cert: String,
    /// Its private key.
    pub key: String,
}

impl CertSpec {
    /// The DNS names the API server may use for the Service.
    pub fn dns_names(&self) -> Vec<String> {
        let (s, ns) = (&self.service, &self.namespace);
        vec![
            format!("{s}.{ns}.svc"),
            format!("{s}.{ns}.svc.cluster.local"),
            format!("{s}.{ns}"),
            s.clone(),
        ]
    }
}

/// A new CA and a certificate it signed for `names`.
pub fn generate(names: &[String]) -> Result<Pems, String> {
    let err = |e: rcgen::Error| format!("generating the webhook certificate: {e}");
    let ca_key = rcgen::KeyPair::generate().map_err(err)?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "railnet webhook CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key).map_err(err)?;
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let mut leaf = rcgen::CertificateParams::new(names.to_vec()).map_err(err)?;
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, names[0].clone());
    let cert = leaf.signed_by(&key, &ca).map_err(err)?;
    Ok(Pems {
        ca: ca.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// The key rustls serves for `pems`.
pub fn certified_key(pems: &Pems) -> Result<Arc<CertifiedKey>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pems.cert.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("webhook certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(pems.key.as_bytes())
        .map_err(|e| format!("webhook key: {e}"))?;
    let key = any_supported_type(&key).map_err(|e| format!("webhook key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(certs, key)))
}

fn pems_of(secret: &Secret) -> Option<Pems> {
    let data = secret.data.as_ref()?;
    let text = |k: &str| String::from_utf8(data.get(k)?.0.clone()).ok();
    Some(Pems {
        ca: text("ca.crt")?,
        cert: text("tls.crt")?,
        key: text("tls.key")?,
    })
}

/// The certificate in the Secret, made first when there is none (or it is
/// not usable); the caBundle is set to its CA.
pub async fn ensure(client: &Client, spec: &CertSpec) -> Result<Pems, String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &spec.namespace);
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let hook = hooks.get_opt(&spec.webhook_config).await.map_err(|e| {
        format!(
            "reading MutatingWebhookConfiguration {}: {e}",
            spec.webhook_config
        )
    })?;
    let existing = secrets
        .get_opt(&spec.secret)
        .await
        .map_err(|e| format!("reading Secret {}/{}: {e}", spec.namespace, spec.secret))?;
    let pems = match existing.as_ref().and_then(pems_of) {
        Some(p) if certified_key(&p).is_ok() => {
            // Made before the webhook configuration existed (a controller
            // faster than Helm): owned by it now, so it goes with it.
            if let (Some(h), Some(s)) = (&hook, &existing)
                && s.metadata
                    .owner_references
                    .as_ref()
                    .is_none_or(Vec::is_empty)
                && let Some(uid) = h.meta().uid.clone()
            {
                let owner = json!({"metadata": {"ownerReferences": [{
                    "apiVersion": "admissionregistration.k8s.io/v1",
                    "kind": "MutatingWebhookConfiguration",
                    "name": spec.webhook_config, "uid": uid}]}});
                if let Err(e) = secrets
                    .patch(&spec.secret, &PatchParams::default(), &Patch::Merge(owner))
                    .await
                {
                    tracing::warn!(error = %e, "cannot give the webhook Secret its owner");
                }
            }
            p
        }
        _ => {
            let pems = generate(&spec.dns_names())?;
            let data = [
                ("ca.crt", &pems.ca),
                ("tls.crt", &pems.cert),
                ("tls.key", &pems.key),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), ByteString(v.clone().into_bytes())))
            .collect();
            let owner = hook.as_ref().and_then(|h| {
                Some(OwnerReference {
                    api_version: "admissionregistration.k8s.io/v1".into(),
                    kind: "MutatingWebhookConfiguration".into(),
                    name: spec.webhook_config.clone(),
                    uid: h.meta().uid.clone()?,
                    ..Default::default()
                })
            });
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(spec.secret.clone()),
                    namespace: Some(spec.namespace.clone()),
                    owner_references: owner.map(|o| vec![o]),
                    labels: Some(
                        [(
                            "app.kubernetes.io/managed-by".to_owned(),
                            "railnet-controller".to_owned(),
                        )]
                        .into(),
                    ),
                    ..Default::default()
                },
                type_: Some("kubernetes.io/tls".into()),
                data: Some(data),
                ..Default::default()
            };
            let written = if let Some(old) = existing {
                // There but unusable (edited by hand): replaced.
                let mut s = secret;
                s.metadata.resource_version = old.metadata.resource_version;
                secrets
                    .replace(&spec.secret, &PostParams::default(), &s)
                    .await
            } else {
                secrets.create(&PostParams::default(), &secret).await
            };
            match written {
                Ok(_) => {
                    tracing::info!(secret = %spec.secret, "made the webhook's certificate");
                    pems
                }
                // Another replica made it first: serve that one.
                Err(kube::Error::Api(e)) if e.code == 409 => secrets
                    .get(&spec.secret)
                    .await
                    .ok()
                    .as_ref()
                    .and_then(pems_of)
                    .ok_or_else(|| format!("Secret {} changed while being made", spec.secret))?,
                Err(e) => {
                    return Err(format!(
                        "writing Secret {}/{}: {e}",
                        spec.namespace, spec.secret
                    ));
                }
            }
        }
    };
    if let Some(hook) = hook {
        let bundle = base64::engine::general_purpose::STANDARD.encode(&pems.ca);
        let stale: Vec<String> = hook
            .webhooks
            .iter()
            .flatten()
            .filter(|w| {
                w.client_config.ca_bundle.as_ref().map(|b| &b.0)
                    != Some(&pems.ca.clone().into_bytes())
            })
            .map(|w| w.name.clone())
            .collect();
        if !stale.is_empty() {
            let patch = json!({"webhooks": stale.iter().map(|n| json!({"name": n, "clientConfig": {"caBundle": bundle}})).collect::<Vec<_>>()});
            hooks
                .patch(
                    &spec.webhook_config,
                    &PatchParams::default(),
                    &Patch::Strategic(patch),
                )
                .await
                .map_err(|e| format!("setting the caBundle of {}: {e}", spec.webhook_config))?;
            tracing::info!(webhook = %spec.webhook_config, "caBundle set to the webhook's CA");
        }
    }
    Ok(pems)
}

/// The certificate the webhook serves, swapped in place when the Secret
/// changes (no restart, no dropped connection).
#[derive(Debug)]
pub struct Reloading(RwLock<Arc<CertifiedKey>>);

impl Reloading {
    /// Serves `key` until [`Reloading::set`].
    pub fn new(key: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Self(RwLock::new(key)))
    }

    /// Serves `key` from now on.
    pub fn set(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = key;
    }

    /// A TLS server config resolving to this certificate.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, String> {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(self.clone());
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// Keeps the served certificate and the caBundle in step with the Secret,
/// every [`REFRESH`], until the task is dropped.
pub async fn keep(client: Client, spec: CertSpec, served: Arc<Reloading>, mut current: Pems) {
    loop {
        tokio::time::sleep(REFRESH).await;
        match ensure(&client, &spec).await {
            Ok(pems) if pems != current => match certified_key(&pems) {
                Ok(key) => {
                    served.set(key);
                    current = pems;
                    tracing::info!("serving the webhook's new certificate");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the webhook Secret's certificate is unusable")
                }
            },
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot check the webhook certificate"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_certificate_serves_and_names_the_service() {
        let spec = CertSpec {
            namespace: "railnet".into(),
            secret: "s".into(),
            service: "railnet-controller".into(),
            webhook_config: "w".into(),
        };
        let pems = generate(&spec.dns_names()).unwrap();
        assert!(certified_key(&pems).is_ok());
        assert!(pems.ca.contains("BEGIN CERTIFICATE") && pems.ca != pems.cert);
        assert_ne!(
            pems,
            generate(&spec.dns_names()).unwrap(),
            "a new key each time"
        );
    }
}
