//! An ADD as a list of steps, each with its own undo, and a DEL as the
//! list of those undos.
//!
//! A step that fails leaves nothing of its own behind; what the steps before
//! it made is then taken down by the very code DEL runs ([`Teardown`]), in
//! DEL's order, every teardown tried even when one fails. The plan (which
//! steps, which undos) is a pure function of the rail's kind, so its order
//! and its rollback are tested here against a fake node, without root.

use crate::{api::ApiError, link::RailLink};

/// One step of a rail's ADD, in the order [`add_plan`] gives them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Addresses from the network's pools (or those an earlier ADD of this
    /// container and interface holds).
    Allocate,
    /// What the kind takes in the host before the interface exists: a
    /// VF's record and its settings through its PF.
    TakeHost,
    /// The VF's own RDMA device into the pod netns (exclusive mode).
    IsolateRdma,
    /// The pod's interface: made, moved in, or (chained) found.
    CreateInterface,
    /// Inside the pod: sysctls, addresses, routes, rules, the rail program.
    ConfigurePod,
}

/// One piece of taking a rail down: DEL runs every one its rail's kind
/// has ([`del_plan`]); a failed ADD the ones its finished steps pushed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Teardown {
    /// The isolated RDMA device back to the host — first: it is found in
    /// the pod netns by the interface it belongs to.
    ReturnRdma,
    /// The pod side: the rail program's pins and railnet's rules go; the
    /// interface is removed, or (not railnet's) stripped of its addresses.
    ClearInterface,
    /// What [`Step::TakeHost`] took goes back (a VF home, its settings
    /// restored).
    GiveHostBack,
    /// The addresses go back to their pools.
    Release,
}

/// The steps of an ADD of a rail of kind `link`, with RDMA isolation or not.
pub fn add_plan(link: &dyn RailLink, isolate_rdma: bool) -> Vec<Step> {
    let mut steps = vec![Step::Allocate];
    if link.takes_host() {
        steps.push(Step::TakeHost);
    }
    if isolate_rdma {
        steps.push(Step::IsolateRdma);
    }
    steps.extend([Step::CreateInterface, Step::ConfigurePod]);
    steps
}

/// What undoes `step` once it has succeeded. Addresses an earlier ADD of
/// the same container and interface held (`held_before`: this is a repeat)
/// are not this ADD's to release: the pod may be using them.
pub fn undo_of(step: Step, held_before: bool) -> Option<Teardown> {
    match step {
        Step::Allocate => (!held_before).then_some(Teardown::Release),
        Step::TakeHost => Some(Teardown::GiveHostBack),
        Step::IsolateRdma => Some(Teardown::ReturnRdma),
        // Configuring the pod changes only the interface: clearing it
        // (pushed once it exists) takes that down too.
        Step::CreateInterface => Some(Teardown::ClearInterface),
        Step::ConfigurePod => None,
    }
}

/// Every teardown of a DEL of a rail of kind `link`, in the order run.
pub fn del_plan(link: &dyn RailLink, isolated_rdma: bool) -> Vec<Teardown> {
    let mut all = vec![Teardown::ClearInterface, Teardown::Release];
    if isolated_rdma {
        all.push(Teardown::ReturnRdma);
    }
    if link.takes_host() {
        all.push(Teardown::GiveHostBack);
    }
    all.sort();
    all
}

/// What takes one rail down on a node (or, in the tests, a fake one).
pub trait TakeDown {
    /// Runs one teardown; `all` lists every teardown of this take-down
    /// (a VF is moved out of the pod only if its interface was made).
    fn teardown(&mut self, t: Teardown, all: &[Teardown]) -> Result<(), String>;
}

/// What runs the steps of one rail's ADD on a node.
pub trait Node: TakeDown {
    /// Runs `step`; on error it has left nothing of its own behind.
    fn run(&mut self, step: Step) -> Result<(), ApiError>;
}

/// Runs `steps` in order; on a failure, takes down what the finished steps
/// made ([`take_down`]) and returns the step's error (the undo's errors
/// are logged: the caller is told why the ADD failed, not how the cleanup
/// went).
pub fn run_add(node: &mut impl Node, steps: &[Step], held_before: bool) -> Result<(), ApiError> {
    let mut undo = Vec::new();
    for &step in steps {
        if let Err(e) = node.run(step) {
            let left = take_down(node, undo);
            if !left.is_empty() {
                tracing::warn!(?step, errors = %left.join("; "), "a failed ADD could not take down all it made");
            }
            return Err(e);
        }
        undo.extend(undo_of(step, held_before));
    }
    Ok(())
}

/// Runs every teardown of `set` in DEL's order, going on past failures;
/// returns the errors met.
pub fn take_down(node: &mut impl TakeDown, mut set: Vec<Teardown>) -> Vec<String> {
    set.sort();
    set.dedup();
    set.iter()
        .filter_map(|&t| node.teardown(t, &set).err())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{link, netconf::Mode};

    /// A node that records what it is asked to do and fails where told.
    #[derive(Default)]
    struct Fake {
        fail_at: Option<Step>,
        failing_teardown: Option<Teardown>,
        log: Vec<String>,
    }

    impl Node for Fake {
        fn run(&mut self, step: Step) -> Result<(), ApiError> {
            self.log.push(format!("{step:?}"));
            if self.fail_at == Some(step) {
                return Err(ApiError::dataplane(format!("{step:?} failed"), ""));
            }
            Ok(())
        }
    }

    impl TakeDown for Fake {
        fn teardown(&mut self, t: Teardown, _: &[Teardown]) -> Result<(), String> {
            self.log.push(format!("undo {t:?}"));
            if self.failing_teardown == Some(t) {
                return Err(format!("{t:?} refused"));
            }
            Ok(())
        }
    }

    fn names(steps: &[Step]) -> Vec<String> {
        steps.iter().map(|s| format!("{s:?}")).collect()
    }

    #[test]
    fn each_kind_adds_in_the_order_its_resources_depend_on() {
        use Step::*;
        for mode in Mode::ALL {
            let kind = link::of(mode);
            let plain = add_plan(kind, false);
            let want: &[Step] = if mode.is_vf() {
                // A VF's settings (a new GUID rebinds it) before its RDMA
                // device moves; both before it moves in.
                &[Allocate, TakeHost, CreateInterface, ConfigurePod]
            } else {
                &[Allocate, CreateInterface, ConfigurePod]
            };
            assert_eq!(plain, want, "{mode}");
            let isolated = add_plan(kind, true);
            let at = isolated.iter().position(|s| *s == IsolateRdma).unwrap();
            assert_eq!(isolated[at + 1], CreateInterface, "{mode}");
            assert!(at == 0 || isolated[at - 1] != CreateInterface, "{mode}");
        }
    }

    /// A failure at each step undoes exactly what the steps before it made,
    /// with DEL's teardowns, in DEL's order.
    #[test]
    fn a_failed_step_takes_down_what_the_steps_before_it_made() {
        for mode in Mode::ALL {
            for isolate in [false, true] {
                let kind = link::of(mode);
                let steps = add_plan(kind, isolate);
                for (k, &failing) in steps.iter().enumerate() {
                    let mut node = Fake {
                        fail_at: Some(failing),
                        ..Fake::default()
                    };
                    let e = run_add(&mut node, &steps, false).unwrap_err();
                    assert_eq!(e.msg, format!("{failing:?} failed"));
                    let mut want = names(&steps[..=k]);
                    let mut undone: Vec<Teardown> = steps[..k]
                        .iter()
                        .filter_map(|s| undo_of(*s, false))
                        .collect();
                    undone.sort();
                    want.extend(undone.iter().map(|t| format!("undo {t:?}")));
                    assert_eq!(
                        node.log, want,
                        "{mode}, isolate {isolate}, failing {failing:?}"
                    );
                }
                // The whole ADD's undo is the whole DEL.
                let mut all: Vec<Teardown> =
                    steps.iter().filter_map(|s| undo_of(*s, false)).collect();
                all.sort();
                assert_eq!(all, del_plan(kind, isolate), "{mode}, isolate {isolate}");
            }
        }
    }

    #[test]
    fn a_vf_whose_move_fails_goes_home_after_its_rdma_device() {
        let steps = add_plan(link::of(Mode::IbSriov), true);
        let mut node = Fake {
            fail_at: Some(Step::CreateInterface),
            ..Fake::default()
        };
        run_add(&mut node, &steps, false).unwrap_err();
        assert_eq!(
            node.log,
            [
                "Allocate",
                "TakeHost",
                "IsolateRdma",
                "CreateInterface",
                "undo ReturnRdma",
                "undo GiveHostBack",
                "undo Release"
            ]
        );
    }

    #[test]
    fn a_repeated_add_that_fails_keeps_the_addresses_the_pod_holds() {
        let steps = add_plan(link::of(Mode::Macvlan), false);
        let mut node = Fake {
            fail_at: Some(Step::ConfigurePod),
            ..Fake::default()
        };
        run_add(&mut node, &steps, true).unwrap_err();
        assert!(
            !node.log.iter().any(|l| l == "undo Release"),
            "{:?}",
            node.log
        );
        assert!(node.log.iter().any(|l| l == "undo ClearInterface"));
    }

    #[test]
    fn a_teardown_that_fails_does_not_stop_the_ones_after_it() {
        let kind = link::of(Mode::Sriov);
        let mut node = Fake {
            failing_teardown: Some(Teardown::ClearInterface),
            ..Fake::default()
        };
        let errors = take_down(&mut node, del_plan(kind, true));
        assert_eq!(errors, ["ClearInterface refused"]);
        assert_eq!(
            node.log,
            [
                "undo ReturnRdma",
                "undo ClearInterface",
                "undo GiveHostBack",
                "undo Release"
            ]
        );
    }
}
