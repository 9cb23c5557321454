//! `cargo xtask …`: the developer and CI entry points of railnet.
//!
//! `setup` installs what a fresh Debian 12 machine lacks, `build` builds the
//! BPF object and the binaries that embed it, `test` runs every test and
//! lint, `demo` shows a pod's rails wired by the real CNI and agent.

mod cluster_tools;
mod image;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "railnet's build, test and demo tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain and packages (idempotent; prints each step).
    Setup,
    /// Build the BPF object, then the agent (embedding it) and the CNI binary.
    Build {
        /// Build in debug mode instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Set up, build, lint and run every test (what CI runs).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// fmt and clippy (-D warnings) on the userspace and BPF crates.
    Lint,
    /// Build railnet's OCI image without Docker: static railnet-agent,
    /// railnet-controller and railnet CNI binaries, written as an OCI
    /// archive at target/images/railnet.tar.
    Image {
        /// Also the cluster tests' pause and workload images.
        #[arg(long)]
        test_images: bool,
    },
    /// Wire a pod's rails with the real CNI and agent in throwaway netns.
    Demo {
        /// `cluster`: the same in a real two-node Kubernetes cluster
        /// (kubelet, containerd, Multus, helm install); default: the quick
        /// embedded demo.
        which: Option<String>,
    },
    /// Fuzz what reaches railnet from outside (CNI stdin, CNI_ARGS, agent
    /// requests) with cargo-fuzz; needs rustup's nightly.
    Fuzz {
        /// Seconds to run.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Benchmarks, printed as figures and ratios to targets (`dataplane`).
    Bench {
        /// Which benchmark: dataplane, ipam, cni, cni-parallel, kube, kube-scale, cluster.
        #[arg(default_value = "dataplane")]
        which: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::Setup => {
            setup::ensure()?;
            setup::ensure_cluster()
        }
        Task::Build { debug } => {
            setup::ensure()?;
            build(&root, !debug).map(|_| ())
        }
        Task::Test { args } => {
            setup::ensure()?;
            setup::ensure_cluster()?;
            test(&root, &args)
        }
        Task::Image { test_images: also } => {
            setup::ensure()?;
            image(&root)?;
            if also {
                setup::ensure_cluster()?;
                test_images(&root)?;
            }
            Ok(())
        }
        Task::Lint => {
            setup::ensure()?;
            let obj = build_bpf(&root)?;
            lint(&root, &obj)
        }
        Task::Fuzz { seconds } => {
            setup::ensure()?;
            if !nightly_present() {
                bail!(
                    "cargo-fuzz needs rustup's nightly toolchain: rustup toolchain install nightly"
                );
            }
            fuzz(&root, seconds)
        }
        Task::Demo { which: None } => {
            setup::ensure()?;
            demo(&root)
        }
        Task::Demo { which: Some(w) } if w == "cluster" => on_test_cluster(
            &root,
            "demo: railnet in a real Kubernetes cluster",
            "railnet-demo-cluster",
        ),
        Task::Demo { which: Some(w) } => {
            bail!("unknown demo {w:?}: `cargo xtask demo` or `cargo xtask demo cluster`")
        }
        Task::Bench { which } if which == "cluster" => on_test_cluster(
            &root,
            "benchmark cluster (pod start-up through kubelet, containerd and Multus)",
            "railnet-bench-cluster",
        ),
        Task::Bench { which } => {
            setup::ensure()?;
            build(&root, true)?;
            let libcni = libcni_client(&root)?;
            step(&format!("benchmark {which}"));
            let bin = root.join("target/release");
            let mut cmd = Command::new(bin.join("railnet-bench"));
            if which == "kube-scale" {
                // It runs kube-apiserver and etcd as the cluster tests do.
                cluster_env(&root, &mut cmd);
            }
            run(cmd
                .arg(&which)
                .env("RAILNET_LIBCNI_BIN", libcni)
                .env("RAILNET_AGENT_BIN", bin.join("railnet-agent"))
                .env("RAILNET_CNI_BIN", bin.join("railnet")))
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command, echoing it, failing with its status.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("  $ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {}", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed with {status}", show(cmd));
    }
    Ok(())
}

pub(crate) fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn step(what: &str) {
    eprintln!("==> {what}");
}

/// How to compile `core` for `bpfel-unknown-none` on this machine.
enum BpfToolchain {
    /// rustup's nightly with rust-src.
    Nightly,
    /// Debian's rustc-web with its library source, via RUSTC_BOOTSTRAP.
    Debian,
}

fn bpf_toolchain() -> Result<BpfToolchain> {
    match setup::forced_toolchain().as_deref() {
        Some("debian") if setup::debian_rustc_has_src() => return Ok(BpfToolchain::Debian),
        Some("nightly") if setup::nightly_has_rust_src() => return Ok(BpfToolchain::Nightly),
        Some(other) => bail!(
            "RAILNET_BPF_TOOLCHAIN={other}: not available; run `cargo xtask setup`, or use nightly or debian"
        ),
        None => {}
    }
    if setup::nightly_has_rust_src() {
        Ok(BpfToolchain::Nightly)
    } else if setup::debian_rustc_has_src() {
        Ok(BpfToolchain::Debian)
    } else {
        bail!(
            "no compiler can build `core` for bpfel-unknown-none: run `cargo xtask setup` \
             (rustup nightly + rust-src, or apt-get install rustc-web rust-web-src)"
        )
    }
}

fn bpf_cargo(root: &Path, subcommand: &str) -> Result<Command> {
    let mut cmd = Command::new("cargo");
    match bpf_toolchain()? {
        BpfToolchain::Nightly => {
            cmd.arg("+nightly");
        }
        BpfToolchain::Debian => {
            cmd.env("RUSTC", "/usr/bin/rustc")
                .env("RUSTC_BOOTSTRAP", "1");
        }
    }
    cmd.current_dir(root).args([
        subcommand,
        "--package",
        "railnet-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
    ]);
    // The BPF build must not see the host build's flags.
    cmd.env_remove("RUSTFLAGS").env_remove("RAILNET_BPF_OBJECT");
    Ok(cmd)
}

/// Builds the tc program; returns the object's path.
fn build_bpf(root: &Path) -> Result<PathBuf> {
    step("building the BPF object (ebpf/railnet-ebpf → bpfel-unknown-none)");
    if !setup::have("bpf-linker") {
        bail!("bpf-linker is not installed: run `cargo xtask setup`");
    }
    run(&mut bpf_cargo(root, "build")?)?;
    let obj = root.join("target/bpfel-unknown-none/release/railnet");
    if !obj.is_file() {
        bail!("BPF build finished but {} is missing", obj.display());
    }
    Ok(obj)
}

/// Builds the object, then the agent and CNI embedding it.
fn build(root: &Path, release: bool) -> Result<PathBuf> {
    let obj = build_bpf(root)?;
    step("building railnet-agent (embeds the BPF object) and the railnet CNI binary");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root).env("RAILNET_BPF_OBJECT", &obj).args([
        "build",
        "--package",
        "railnet-agent",
        "--package",
        "railnet-cni",
        "--package",
        "railnet-tests",
        "--bins",
    ]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let dir = root
        .join("target")
        .join(if release { "release" } else { "debug" });
    eprintln!("    agent: {}", dir.join("railnet-agent").display());
    eprintln!("    cni:   {}", dir.join("railnet").display());
    Ok(obj)
}

fn lint(root: &Path, obj: &Path) -> Result<()> {
    step("cargo fmt --check");
    run(Command::new("cargo")
        .current_dir(root)
        .args(["fmt", "--all", "--check"]))?;
    step("clippy -D warnings on the userspace crates");
    run(Command::new("cargo")
        .current_dir(root)
        .env("RAILNET_BPF_OBJECT", obj)
        .args([
            "clippy",
            "--workspace",
            "--exclude",
            "railnet-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    step("clippy -D warnings on the BPF crate");
    match bpf_toolchain()? {
        BpfToolchain::Nightly => {
            let mut cmd = bpf_cargo(root, "clippy")?;
            cmd.args(["--", "-D", "warnings"]);
            run(&mut cmd)?;
        }
        BpfToolchain::Debian => {
            // Debian ships no clippy for rustc-web; lint the same source for
            // the host with panic=abort (what a no_std bin needs there).
            run(Command::new("cargo")
                .current_dir(root)
                .env("CARGO_PROFILE_DEV_PANIC", "abort")
                .env("CARGO_TARGET_DIR", root.join("target/bpf-host-lint"))
                .args([
                    "clippy",
                    "--package",
                    "railnet-ebpf",
                    "--",
                    "-D",
                    "warnings",
                ]))?;
        }
    }
    Ok(())
}

/// An agent built without the BPF object must refuse to start, saying why.
fn check_stub_agent(root: &Path) -> Result<()> {
    step("an agent built without bpf-linker refuses to start");
    run(Command::new("cargo")
        .current_dir(root)
        .env_remove("RAILNET_BPF_OBJECT")
        .args(["build", "--package", "railnet-agent"]))?;
    let out = Command::new(root.join("target/debug/railnet-agent"))
        .args(["--config", "/nonexistent"])
        .output()
        .context("run the stub agent")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(3) || !stderr.contains("stub BPF objects") {
        bail!(
            "the stub agent did not refuse clearly: {}: {stderr}",
            out.status
        );
    }
    eprintln!("    {}", stderr.trim());
    Ok(())
}

fn nightly_present() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// cargo-fuzz on `fuzz/fuzz_targets/cni_input.rs` for `seconds`; a crash
/// fails with the input that caused it (under fuzz/artifacts/).
fn fuzz(root: &Path, seconds: u64) -> Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        step("cargo-fuzz (crates.io)");
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    step(&format!(
        "fuzzing CNI stdin, CNI_ARGS and agent requests for {seconds} s (cargo-fuzz, libFuzzer)"
    ));
    run(Command::new("cargo")
        .current_dir(root.join("fuzz"))
        .args(["+nightly", "fuzz", "run", "cni_input", "--"])
        .arg(format!("-max_total_time={seconds}")))
}

fn test(root: &Path, args: &[String]) -> Result<()> {
    check_stub_agent(root)?;
    let obj = build(root, false)?;
    lint(root, &obj)?;
    let libcni = libcni_client(root)?;
    image(root)?;
    test_images(root)?;
    step(
        "unit and privileged integration tests (real netns, macvlan, clsact and TCX, bpffs; a real Kubernetes cluster)",
    );
    let bin = root.join("target/debug");
    let mut cmd = Command::new("cargo");
    cluster_env(root, &mut cmd);
    cmd.current_dir(root)
        .env("RAILNET_LIBCNI_BIN", &libcni)
        .env("RAILNET_BPF_OBJECT", &obj)
        .env("RAILNET_AGENT_BIN", bin.join("railnet-agent"))
        .env("RAILNET_CNI_BIN", bin.join("railnet"))
        .env("RAILNET_CTL_BIN", bin.join("railnetctl"))
        .args(["test", "--workspace", "--exclude", "railnet-ebpf"])
        .args(args);
    run(&mut cmd)?;
    pre_tcx_kernel_tests(root, &obj)?;
    rdma_kernel_tests(root, &obj)?;
    ipam_power_cut(root)?;
    if nightly_present() {
        fuzz(root, 20)?;
    } else {
        step("fuzzing skipped: cargo-fuzz needs rustup's nightly, which this machine lacks");
    }
    step("all tests passed");
    Ok(())
}

/// Durability `kill -9` cannot show (it leaves the page cache intact): the
/// agent and its store run in a qemu guest on a virtual disk, qemu is
/// killed mid-load, the guest boots again from the same disk, and every
/// allocation the agent acknowledged must be there, none twice.
fn ipam_power_cut(root: &Path) -> Result<()> {
    use std::{
        collections::{HashMap, HashSet},
        io::{BufRead, BufReader},
        os::unix::process::CommandExt,
        process::Stdio,
        time::{Duration, Instant},
    };
    step(
        "IPAM durability across a power cut (agent in Linux 6.1 under qemu; qemu killed mid-load)",
    );
    let target = root.join("target");
    let img = target.join("vm-ipam.img");
    std::fs::File::create(&img)?.set_len(64 << 20)?;
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img))?;
    let pools = target.join("vm-ipam-pools.yaml");
    std::fs::write(
        &pools,
        "pools:\n  - name: rail1\n    subnet: 10.9.0.0/16\n    gateway: 10.9.0.1\n",
    )?;
    let bin = target.join("debug");
    let disk = format!(
        "file={},format=raw,if=virtio,cache=writeback",
        img.display()
    );
    let mount =
        "modprobe virtio_blk; modprobe ext4; mkdir -p /run/state; mount /dev/vda /run/state";
    let load = target.join("vm-ipam-load.sh");
    std::fs::write(
        &load,
        format!(
            "{mount}\nmkdir -p /run/railnet\n\
             {agent} --config {pools} --state /run/state/ipam.redb --socket /run/railnet/s \
               --pin-root /sys/fs/bpf --node-name vm 2>/dev/null &\n\
             while [ ! -S /run/railnet/s ]; do sleep 0.1; done\n\
             echo LOAD-START\n\
             exec {loader} load /run/railnet/s\n",
            agent = bin.join("railnet-agent").display(),
            pools = pools.display(),
            loader = bin.join("railnet-ipam-load").display(),
        ),
    )?;
    let mut vm = Command::new("bash")
        .arg(root.join("tests/vm/vmrun.sh"))
        .arg(&load)
        .arg("-drive")
        .arg(&disk)
        .env("VM_TIMEOUT", "600")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("boot the guest")?;
    let pgid = vm.id() as i32;
    let mut acked: HashMap<String, String> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(420);
    let lines = BufReader::new(vm.stdout.take().expect("piped"));
    for line in lines.lines() {
        let line = line.unwrap_or_default();
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 3 && f[0] == "ACK" {
            acked.insert(f[1].to_owned(), f[2].to_owned());
        }
        // Cut the power somewhere in the middle of the load.
        if acked.len() >= 600 || Instant::now() > deadline {
            break;
        }
    }
    // SAFETY: kill(2) on the process group we created; no memory involved.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let _ = vm.wait();
    if acked.len() < 100 {
        bail!(
            "only {} allocations acknowledged before the cut: the guest did not get going",
            acked.len()
        );
    }
    let dump = target.join("vm-ipam-dump.sh");
    std::fs::write(
        &dump,
        format!(
            "{mount}\n{} dump /run/state/ipam.redb\n",
            bin.join("railnet-ipam-load").display()
        ),
    )?;
    let out = Command::new("bash")
        .arg(root.join("tests/vm/vmrun.sh"))
        .arg(&dump)
        .arg("-drive")
        .arg(&disk)
        .env("VM_TIMEOUT", "300")
        .output()
        .context("boot the guest again")?;
    let mut held: HashMap<String, String> = HashMap::new();
    let mut addrs = HashSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 3 && f[0] == "HELD" {
            if !addrs.insert(f[2].to_owned()) {
                bail!("after the power cut {} is held twice", f[2]);
            }
            held.insert(f[1].to_owned(), f[2].to_owned());
        }
    }
    let lost: Vec<_> = acked
        .iter()
        .filter(|(c, a)| held.get(*c) != Some(*a))
        .collect();
    if !lost.is_empty() {
        bail!(
            "{} acknowledged allocations lost in the power cut, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(3)]
        );
    }
    eprintln!(
        "    power cut after {} acknowledged allocations: all {} found after reboot ({} on disk, 0 duplicates)",
        acked.len(),
        acked.len(),
        held.len()
    );
    let _ = std::fs::remove_file(&img);
    Ok(())
}

/// Path of the test binary of `tests/tests/<name>.rs`, built if needed.
fn test_binary(root: &Path, obj: &Path, name: &str) -> Result<String> {
    let out = Command::new("cargo")
        .current_dir(root)
        .env("RAILNET_BPF_OBJECT", obj)
        .args([
            "test",
            "--package",
            "railnet-tests",
            "--test",
            name,
            "--no-run",
            "--message-format=json",
        ])
        .output()
        .with_context(|| format!("build the {name} test binary"))?;
    let wanted = format!("\"name\":\"{name}\"");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\"") && l.contains(&wanted))
        .find_map(|l| {
            let at = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            Some(l[at..].split('"').next()?.to_owned())
        })
        .with_context(|| format!("no {name} test binary in cargo's output"))
}

/// Runs `body` as root in Debian's Linux 6.1 under qemu (tests/vm), with
/// /run/netns ready and the agent and CNI binaries of target/debug named
/// in the environment the tests read; fails if the script does.
fn in_guest(root: &Path, name: &str, body: &str) -> Result<()> {
    let bin = root.join("target/debug");
    let script = root.join(format!("target/vm-{name}.sh"));
    std::fs::write(
        &script,
        format!(
            "set -e\n\
             mkdir -p /run/netns\n\
             export RAILNET_AGENT_BIN={agent} RAILNET_CNI_BIN={cni} RAILNET_CTL_BIN={ctl} RUST_BACKTRACE=0\n\
             {body}",
            agent = bin.join("railnet-agent").display(),
            cni = bin.join("railnet").display(),
            ctl = bin.join("railnetctl").display(),
        ),
    )?;
    let status = Command::new("bash")
        .arg(root.join("tests/vm/vmrun.sh"))
        .arg(&script)
        .env("VM_TIMEOUT", "1200")
        .status()
        .context("run tests/vm/vmrun.sh")?;
    if !status.success() {
        bail!("the guest script failed ({status}); output above");
    }
    Ok(())
}

/// The dataplane tests that matter most, again on Debian's Linux 6.1 under
/// qemu: no TCX there, so the agent attaches clsact filters. The guest
/// sees this machine's root read-only and runs the test binary built above.
fn pre_tcx_kernel_tests(root: &Path, obj: &Path) -> Result<()> {
    step("dataplane tests on Linux 6.1 (clsact, no TCX) under qemu");
    let binary = test_binary(root, obj, "dataplane")?;
    let ipvlan = test_binary(root, obj, "ipvlan")?;
    let identity = test_binary(root, obj, "netns_identity")?;
    in_guest(
        root,
        "dataplane",
        &format!(
            "echo \"guest kernel $(uname -r)\"\n\
             {binary} --test-threads=2 \
               rail_sourced_ping_and_tcp_cross_their_own_rail \
               routing_survives_an_agent_crash \
               del_and_a_vanished_netns_leave_no_program_map_or_pin\n\
             {ipvlan} --test-threads=2 --include-ignored\n\
             {identity}\n"
        ),
    )
    .context("dataplane tests on Linux 6.1")?;
    step("SR-IOV VF attributes through a netdevsim PF on Linux 6.1 under qemu");
    let sriov = test_binary(root, obj, "sriov")?;
    in_guest(
        root,
        "sriov",
        &format!("modprobe netdevsim\n{sriov} --test-threads=1 --include-ignored\n"),
    )
    .context("SR-IOV tests on Linux 6.1")?;
    Ok(())
}

/// Builds tests/libcni (a runtime-like client on Debian's libcni) in
/// GOPATH mode against /usr/share/gocode, where Debian puts Go sources.
fn libcni_client(root: &Path) -> Result<PathBuf> {
    step("libcni test client (Go, Debian's libcni)");
    let out = root.join("target/railnet-libcni");
    run(Command::new("go")
        .current_dir(root)
        .env("GOPATH", "/usr/share/gocode")
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .args(["build", "-o"])
        .arg(&out)
        .arg("tests/libcni/railnet-libcni.go"))?;
    Ok(out)
}

/// The RDMA tests, in Debian's Linux 6.1 under qemu (this machine's kernel
/// has no RDMA subsystem): one guest left in shared mode, one switched to
/// exclusive mode before any netns exists (the kernel refuses the switch
/// after).
fn rdma_kernel_tests(root: &Path, obj: &Path) -> Result<()> {
    let binary = test_binary(root, obj, "rdma")?;
    for (mode, prepare) in [
        ("shared", ""),
        ("exclusive", "rdma system set netns exclusive\n"),
    ] {
        step(&format!(
            "RDMA tests on Linux 6.1 under qemu, {mode} netns mode (soft RoCE, soft iWARP)"
        ));
        in_guest(
            root,
            &format!("rdma-{mode}"),
            &format!(
                "modprobe rdma_rxe; modprobe siw; modprobe ib_uverbs; modprobe rdma_ucm\n\
                 {prepare}\
                 {binary} --ignored --test-threads=1 {mode}_\n"
            ),
        )
        .with_context(|| format!("RDMA tests ({mode} mode) on Linux 6.1"))?;
    }
    Ok(())
}

/// Sets up the cluster components and images, then builds the tests
/// crate's binary `name` (release) and runs it on them.
fn on_test_cluster(root: &Path, what: &str, name: &str) -> Result<()> {
    setup::ensure()?;
    setup::ensure_cluster()?;
    image(root)?;
    test_images(root)?;
    let mut extra = Vec::new();
    if name == "railnet-bench-cluster" {
        for c in cluster_tools::BENCH_COMPONENTS {
            if !c.present() {
                step(&format!(
                    "building {} {} (the benchmark's reference IPAM)",
                    c.name, c.version
                ));
                c.build(root)?;
            }
        }
        extra.push((
            "RAILNET_WHEREABOUTS_BIN",
            cluster_tools::BENCH_COMPONENTS[0].dir().join("whereabouts"),
        ));
        extra.push((
            "RAILNET_WHEREABOUTS_CRDS",
            cluster_tools::whereabouts_crds(root)?,
        ));
    }
    step(what);
    run(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "--package",
        "railnet-tests",
        "--bin",
        name,
    ]))?;
    let mut cmd = Command::new(root.join("target/release").join(name));
    cluster_env(root, &mut cmd);
    cmd.envs(extra);
    run(&mut cmd)
}

fn demo(root: &Path) -> Result<()> {
    build(root, true)?;
    step("demo");
    let bin = root.join("target/release");
    run(Command::new(bin.join("railnet-demo"))
        .env("RAILNET_AGENT_BIN", bin.join("railnet-agent"))
        .env("RAILNET_CNI_BIN", bin.join("railnet"))
        .env("RAILNET_CTL_BIN", bin.join("railnetctl")))
}

/// The image's repository: the chart's default `image.repository`.
const IMAGE_REPOSITORY: &str = "ghcr.io/railnet/railnet";

/// The chart's appVersion, the image's tag (the chart's default `image.tag`).
fn chart_app_version(root: &Path) -> Result<String> {
    let chart = std::fs::read_to_string(root.join("charts/railnet/Chart.yaml"))?;
    chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .context("charts/railnet/Chart.yaml has no appVersion")
}

/// Whether an ELF executable asks for a program interpreter (a dynamic
/// loader): a CNI binary that does would need the node's libc.
fn has_interpreter(path: &Path) -> Result<bool> {
    let elf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&elf[o..o + 8]);
        u64::from_le_bytes(b) as usize
    };
    if elf.len() < 64 || &elf[..5] != b"\x7fELF\x02" {
        bail!("{} is not a 64-bit ELF file", path.display());
    }
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    Ok((0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        elf.get(o..o + 4)
            .is_some_and(|t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]) == PT_INTERP)
    }))
}

/// Builds the static binaries and writes railnet's image; returns the
/// archive's path.
fn image(root: &Path) -> Result<PathBuf> {
    let obj = build_bpf(root)?;
    step(
        "static railnet-agent, railnet-controller, railnet and railnetctl (x86_64-unknown-linux-gnu, +crt-static)",
    );
    // An explicit --target keeps +crt-static away from proc-macro crates,
    // which must stay dynamic libraries of the host.
    let target = "x86_64-unknown-linux-gnu";
    run(Command::new("cargo")
        .current_dir(root)
        .env("RAILNET_BPF_OBJECT", &obj)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args([
            "build",
            "--release",
            "--target",
            target,
            "--package",
            "railnet-agent",
            "--package",
            "railnet-cni",
            "--bins",
        ]))?;
    let bin = root.join("target").join(target).join("release");
    let mut entries = vec![
        image::Entry::Dir("usr"),
        image::Entry::Dir("usr/local"),
        image::Entry::Dir("usr/local/bin"),
    ];
    for name in [
        "railnet-agent",
        "railnet-controller",
        "railnet",
        "railnetctl",
    ] {
        let path = bin.join(name);
        if has_interpreter(&path)? {
            bail!(
                "{} is dynamically linked (it has an ELF interpreter); the image needs static binaries",
                path.display()
            );
        }
        entries.push(image::file_from(
            &format!("usr/local/bin/{name}"),
            0o755,
            &path,
        )?);
    }
    let name = format!("{IMAGE_REPOSITORY}:{}", chart_app_version(root)?);
    let out = root.join("target/images/railnet.tar");
    let digest = image::write_oci_archive(
        &image::Image {
            name: name.clone(),
            entries,
            entrypoint: vec!["/usr/local/bin/railnet-agent".into()],
        },
        &out,
    )?;
    eprintln!("    {name} ({digest})");
    eprintln!("    {}", out.display());
    Ok(out)
}

/// Where the cluster tests find their components (`cargo xtask setup`
/// built them) and images.
fn cluster_env(root: &Path, cmd: &mut Command) {
    let dir = |name: &str| {
        cluster_tools::COMPONENTS
            .iter()
            .find(|c| c.name == name)
            .expect("a known component")
            .dir()
    };
    cmd.env("RAILNET_KUBERNETES_DIR", dir("kubernetes"))
        .env("RAILNET_ETCD_BIN", dir("etcd").join("etcd"))
        .env("RAILNET_CONTAINERD_DIR", dir("containerd"))
        .env("RAILNET_MULTUS_BIN", dir("multus").join("multus"))
        .env("RAILNET_HELM", setup::HELM)
        .env(
            "RAILNET_DEVICE_PLUGIN_BIN",
            cluster_tools::device_plugin_path(root),
        )
        .env(
            "RAILNET_GPU_DRIVER_BIN",
            cluster_tools::gpu_driver_path(root),
        )
        .env("RAILNET_IMAGES_DIR", root.join("target/images"));
}

/// The images the cluster tests run besides railnet's: the sandbox
/// ("pause", Kubernetes' pause.c) and a workload with busybox's `ip`,
/// `ping`, `cat` and `sh` (Debian's busybox-static).
fn test_images(root: &Path) -> Result<()> {
    step("test images: pause (registry.k8s.io/pause:3.10.2) and the workload (busybox)");
    let pause = cluster_tools::pause_binary(root)?;
    let out = root.join("target/images");
    let digest = image::write_oci_archive(
        &image::Image {
            name: "registry.k8s.io/pause:3.10.2".into(),
            entries: vec![image::file_from("pause", 0o755, &pause)?],
            entrypoint: vec!["/pause".into()],
        },
        &out.join("pause.tar"),
    )?;
    eprintln!("    pause: {digest}");
    let mut entries = vec![
        image::Entry::Dir("bin"),
        image::file_from("bin/busybox", 0o755, Path::new("/bin/busybox"))?,
    ];
    for applet in [
        "sh", "ip", "ping", "cat", "sleep", "ls", "grep", "ps", "nc", "echo", "env", "wc", "true",
    ] {
        entries.push(image::Entry::Symlink {
            path: format!("bin/{applet}"),
            target: "busybox".into(),
        });
    }
    // Empty mount points the runtime fills.
    entries.extend([
        image::Entry::Dir("etc"),
        image::Entry::Dir("proc"),
        image::Entry::Dir("sys"),
        image::Entry::Dir("dev"),
        image::Entry::Dir("tmp"),
    ]);
    let digest = image::write_oci_archive(
        &image::Image {
            name: WORKLOAD_IMAGE.into(),
            entries,
            entrypoint: vec!["/bin/sh".into()],
        },
        &out.join("workload.tar"),
    )?;
    eprintln!("    workload: {digest}");
    Ok(())
}

/// The cluster tests' workload image.
const WORKLOAD_IMAGE: &str = "localhost/railnet-test/workload:1";
