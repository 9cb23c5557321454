//! The test cluster's throwaway PKI (openssl, valid a day): one CA, the API
//! server's serving certificate, a client certificate per identity, the
//! service-account signing key, and kubeconfigs naming them.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::{sh, test_ca, test_certificate};

const CLIENT: &str = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";

/// The cluster's PKI directory.
#[derive(Debug)]
pub struct Pki {
    /// Where the files are.
    pub dir: PathBuf,
    /// The API server's URL, as every kubeconfig names it.
    pub server: String,
}

impl Pki {
    /// Makes the CA, the API server's certificate (for `api_ip` and the
    /// `kubernetes` Service's first address) and the service-account key.
    #[track_caller]
    pub fn new(dir: &Path, api_ip: &str, service_ip: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        test_ca(dir, "railnet-test-cluster-ca");
        test_certificate(
            dir,
            "apiserver",
            "/CN=kube-apiserver",
            &format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=serverAuth\nsubjectAltName=IP:{api_ip},IP:{service_ip},DNS:kubernetes,\
                 DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
            ),
        );
        sh(Command::new("openssl")
            .current_dir(dir)
            .args(["genrsa", "-out", "sa.key", "2048"]));
        sh(Command::new("openssl")
            .current_dir(dir)
            .args(["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]));
        Self {
            dir: dir.to_owned(),
            server: format!("https://{api_ip}:6443"),
        }
    }

    /// A file of the PKI.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A client certificate for `user` in `groups` and a kubeconfig using
    /// it; returns the kubeconfig's path (`<name>.kubeconfig`).
    #[track_caller]
    pub fn client(&self, name: &str, user: &str, groups: &[&str]) -> PathBuf {
        let subject: String = groups
            .iter()
            .map(|g| format!("/O={g}"))
            .chain([format!("/CN={user}")])
            .collect();
        test_certificate(&self.dir, name, &subject, CLIENT);
        let path = self.dir.join(format!("{name}.kubeconfig"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\n\
                 clusters: [{{name: test, cluster: {{server: \"{server}\", certificate-authority: {d}/ca.crt}}}}]\n\
                 users: [{{name: {name}, user: {{client-certificate: {d}/{name}.crt, client-key: {d}/{name}.key}}}}]\n\
                 contexts: [{{name: test, context: {{cluster: test, user: {name}}}}}]\ncurrent-context: test\n",
                server = self.server,
                d = self.dir.display(),
            ),
        )
        .unwrap();
        path
    }
}
