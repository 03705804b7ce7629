//! Simulator runs: many seeds in CI, the large scenarios, and the replay of one seed.
//!
//! A failing seed prints the command that replays it:
//! `KITH_SIM_SEED=<seed> cargo test -p kith-protocol sim::tests::replay -- --nocapture`.
//! `KITH_SIM_SEEDS=<n>` changes how many seeds [`seeds`] runs (default [`CI_SEEDS`]).

use std::time::Instant;

use super::*;

/// Seeds the CI test runs.
const CI_SEEDS: u64 = 150;

/// The scenario a seed runs: the seed picks the kind and everything random in it.
fn scenario(seed: u64) -> (&'static str, Config) {
    let all = |n: usize| (0..n).collect::<Vec<_>>();
    match seed % 4 {
        0 => (
            "chaos: loss, duplicates, crashes, a partition, commits",
            Config {
                members: 4,
                strangers: 1,
                messages: 40,
                senders: all(4),
                send_every_ms: (50, 600),
                commits: 2,
                drop: 0.05,
                duplicate: 0.05,
                rate_limited: 0.05,
                crashable: all(4),
                crashes: 2,
                down_ms: (500, 20_000),
                partitions: 1,
                partition_ms: (1_000, 40_000),
                ..Config::default()
            },
        ),
        1 => (
            "offline: one member down while 120 messages and a commit pass",
            Config {
                members: 3,
                messages: 120,
                senders: vec![0, 1],
                send_every_ms: (20, 80),
                commits: 1,
                drop: 0.02,
                outages: vec![(2, 100, 9_000)],
                ..Config::default()
            },
        ),
        2 => (
            "partitions: five members, all sending, two splits",
            Config {
                members: 5,
                messages: 50,
                senders: all(5),
                send_every_ms: (50, 500),
                commits: 2,
                drop: 0.03,
                rate_limited: 0.1,
                partitions: 2,
                partition_ms: (2_000, 30_000),
                ..Config::default()
            },
        ),
        _ => (
            "gossip loss: a fifth of deliveries lost, a tenth doubled",
            Config {
                members: 3,
                messages: 80,
                senders: vec![0, 1],
                send_every_ms: (10, 200),
                drop: 0.2,
                duplicate: 0.1,
                crashable: vec![1, 2],
                crashes: 1,
                ..Config::default()
            },
        ),
    }
}

/// Writes a run's summary line where `cargo test` shows it, also for a test that passes
/// (straight to the process's stderr, which the harness does not capture), so CI's log has
/// the seed count and run time.
fn report(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn replay_line(seed: u64) -> String {
    format!("KITH_SIM_SEED={seed} cargo test -p kith-protocol sim::tests::replay -- --nocapture")
}

/// A named scenario and its configuration.
type Named = (&'static str, fn() -> Config);

/// The join scenarios, by the name `KITH_SIM_SCENARIO` gives them to [`replay`].
const JOIN_SCENARIOS: [Named; 3] = [
    ("joins_in_turn", joins_in_turn),
    ("joins_with_loss", joins_with_loss_cfg),
    ("joins_that_race", racing_joins),
];

fn join_replay_line(scenario: &str, seed: u64) -> String {
    format!(
        "KITH_SIM_SCENARIO={scenario} KITH_SIM_SEED={seed} cargo test -p kith-protocol sim::tests::replay -- --nocapture"
    )
}

/// Runs `cfg` from `seed`; the violations, if any.
fn run(cfg: Config, seed: u64) -> (World, Vec<String>) {
    let mut w = World::new(cfg, seed);
    w.run();
    let bad = w.check();
    (w, bad)
}

#[test]
fn seeds() {
    let count = std::env::var("KITH_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(CI_SEEDS);
    let started = Instant::now();
    let mut failed = Vec::new();
    let mut sent = 0;
    let mut virtual_ms = 0;
    let mut recovered = 0;
    let (mut admitted, mut join_lost, mut deep_forks) = (0, 0, 0);
    for seed in 0..count {
        let (name, cfg) = scenario(seed);
        let (w, bad) = run(cfg, seed);
        sent += w.sent();
        virtual_ms += w.stats.virtual_ms;
        recovered += w.recovered();
        admitted += w.stats.admitted;
        join_lost += w.stats.join_lost;
        deep_forks += w.stats.deep_forks;
        if !bad.is_empty() {
            failed.push(format!(
                "seed {seed} ({name}): {}\n  replay: {}",
                bad.join("; "),
                replay_line(seed)
            ));
        }
    }
    report(format_args!(
        "simulator: {count} seeds, {sent} messages, {} simulated hours in {:.1} s; {recovered} undecryptable texts re-sent on request; {admitted} members added by invite or again, {join_lost} joins that lost a race, {deep_forks} deep forks; {} failed",
        virtual_ms / 3_600_000,
        started.elapsed().as_secs_f64(),
        failed.len()
    ));
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// Replays `KITH_SIM_SEED` with its statistics (does nothing without it): of the scenario
/// `KITH_SIM_SCENARIO` names (one of [`JOIN_SCENARIOS`]), or else the one [`seeds`] runs for
/// that seed.
#[test]
fn replay() {
    let Some(seed) = std::env::var("KITH_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    else {
        return;
    };
    let (name, cfg) = match std::env::var("KITH_SIM_SCENARIO") {
        Ok(wanted) => {
            let Some((name, cfg)) = JOIN_SCENARIOS.iter().find(|(n, _)| *n == wanted) else {
                panic!("no scenario named {wanted}");
            };
            (*name, cfg())
        }
        Err(_) => scenario(seed),
    };
    println!("seed {seed}: {name}\n{cfg:?}");
    let (w, bad) = run(cfg, seed);
    println!("{:?}", w.stats);
    for b in &bad {
        println!("violation: {b}");
    }
    assert!(bad.is_empty(), "seed {seed} failed");
}

/// Runs `seeds` seeds of `cfg`, prints the count and time, and fails on any violation.
fn join_seeds(name: &str, default_seeds: u64) {
    let Some((_, cfg)) = JOIN_SCENARIOS.iter().find(|(n, _)| *n == name) else {
        panic!("no scenario named {name}");
    };
    let seeds = std::env::var("KITH_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_seeds);
    let started = Instant::now();
    let mut failed = Vec::new();
    let (mut admitted, mut refused, mut lost) = (0, 0, 0);
    for seed in 0..seeds {
        let (w, bad) = run(cfg(), seed);
        admitted += w.stats.admitted;
        lost += w.stats.join_lost;
        refused += w
            .ends
            .values()
            .filter(|e| !matches!(e, JoinEnd::Joined))
            .count();
        if !bad.is_empty() {
            failed.push(format!(
                "seed {seed}: {}\n  replay: {}",
                bad.join("; "),
                join_replay_line(name, seed)
            ));
        }
    }
    report(format_args!(
        "{name}: {seeds} seeds in {:.1} s; {admitted} members added, {refused} joiners turned away, {lost} joins that lost a race or were doubted; {} failed",
        started.elapsed().as_secs_f64(),
        failed.len()
    ));
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// Joins by invite in CI: three joiners one after another share an invite of two uses, with
/// reordering, duplicated gossip, and members sending throughout. Checks, besides the
/// delivery properties: the invite's uses are never exceeded, every member counts exactly
/// the joins that stand, a joiner hears "used up" only when the uses are all taken, a
/// joiner that was added is a member everywhere, one that was turned away is nowhere.
#[test]
fn joins_in_turn_with_reordering() {
    join_seeds("joins_in_turn", 30);
}

/// The same joins with 5 % gossip loss and a short partition, in CI (40 seeds). Before
/// sealed re-sends about 60 % of seeds lost one to three texts as `epoch_gone`: a text whose
/// live copy was lost reached a member by sync after its epoch's keys were gone there, and
/// its sender refused to send it again because someone had joined since. Now it comes back
/// sealed for its epoch's members (`group::resend`).
#[test]
fn joins_with_loss() {
    join_seeds("joins_with_loss", 40);
}

/// Four joiners racing for an invite of three uses, with member 0 committing meanwhile,
/// loss, a partition and member crashes: joins lose races, are doubted, join again, and
/// deep forks ask to be re-added. In CI (40 seeds). It failed 15 of 40 seeds before sealed
/// re-sends, then 2 to 4: a joiner that joined on a branch that lost kept a use it learnt
/// there (it joins again rather than rolling back, and merging the new invite states keeps
/// the larger count). A new Welcome on a dead branch now forgets the group's invite counts
/// (`Effect::ForgetInvites`); 150 of 150 seeds pass.
#[test]
fn joins_that_race() {
    join_seeds("joins_that_race", 40);
}

/// Three joiners one after another, two uses of one invite.
fn joins_in_turn() -> Config {
    Config {
        members: 3,
        joiners: 3,
        invite_uses: 2,
        join_every_ms: Some((15_000, 25_000)),
        strangers: 1,
        messages: 80,
        senders: (0..3).collect(),
        send_every_ms: (100, 900),
        duplicate: 0.05,
        ..Config::default()
    }
}

fn joins_with_loss_cfg() -> Config {
    Config {
        drop: 0.05,
        partitions: 1,
        partition_ms: (1_000, 10_000),
        ..joins_in_turn()
    }
}

fn racing_joins() -> Config {
    Config {
        members: 3,
        joiners: 4,
        invite_uses: 3,
        strangers: 1,
        messages: 60,
        senders: (0..3).collect(),
        send_every_ms: (100, 800),
        commits: 2,
        drop: 0.05,
        duplicate: 0.05,
        crashable: vec![1, 2],
        crashes: 1,
        down_ms: (500, 15_000),
        partitions: 1,
        partition_ms: (1_000, 30_000),
        ..Config::default()
    }
}

fn big(name: &str, cfg: Config, seed: u64) {
    let started = Instant::now();
    let (w, bad) = run(cfg, seed);
    report(format_args!(
        "simulator, {name}: {} messages, {} simulated minutes in {:.1} s, {:?}",
        w.sent(),
        w.stats.virtual_ms / 60_000,
        started.elapsed().as_secs_f64(),
        w.stats
    ));
    assert!(bad.is_empty(), "{name} (seed {seed}): {}", bad.join("; "));
}

#[test]
fn five_thousand_messages_from_one_sender_while_a_member_is_down() {
    big(
        "5000 messages, member 2 down for the first 30 s",
        Config {
            members: 3,
            messages: 5_000,
            senders: vec![0],
            send_every_ms: (1, 20),
            outages: vec![(2, 10, 30_000)],
            ..Config::default()
        },
        1,
    );
}

#[test]
fn five_thousand_messages_from_one_sender_while_a_member_is_cut_off() {
    big(
        "5000 messages, member 2 cut off for the first 30 s",
        Config {
            members: 3,
            messages: 5_000,
            senders: vec![0],
            send_every_ms: (1, 20),
            cuts: vec![(vec![2], 10, 30_000)],
            ..Config::default()
        },
        2,
    );
}

#[test]
fn many_senders_with_crashes_and_commits() {
    big(
        "10 members all sending, crashes, commits",
        Config {
            members: 10,
            strangers: 1,
            messages: 600,
            senders: (0..10).collect(),
            send_every_ms: (5, 100),
            commits: 3,
            drop: 0.05,
            duplicate: 0.02,
            rate_limited: 0.05,
            crashable: (1..10).collect(),
            crashes: 4,
            partitions: 1,
            ..Config::default()
        },
        3,
    );
}

#[test]
fn thirty_members_for_two_simulated_hours() {
    big(
        "30 members, 2 hours",
        Config {
            members: 30,
            messages: 120,
            senders: (0..30).collect(),
            send_every_ms: (10_000, 110_000),
            drop: 0.05,
            crashable: vec![5, 6, 7],
            crashes: 3,
            down_ms: (60_000, 600_000),
            ..Config::default()
        },
        4,
    );
}

/// Fifty members for two simulated hours, with loss, crashes and two joiners: the size the
/// issue asks the simulator to reach. Outside CI for time; in a release build on the 2-core
/// development machine it took 15.6 s (810,190 events, 149 messages, 124 simulated minutes):
/// `cargo test -p kith-protocol --release sim::tests::fifty_members -- --ignored --nocapture`.
#[test]
#[ignore = "long: run on demand"]
fn fifty_members_for_two_simulated_hours() {
    big(
        "50 members, 2 hours",
        Config {
            members: 50,
            joiners: 2,
            invite_uses: 2,
            join_every_ms: Some((600_000, 1_800_000)),
            messages: 150,
            senders: (0..50).collect(),
            send_every_ms: (10_000, 90_000),
            drop: 0.05,
            crashable: vec![5, 6, 7],
            crashes: 3,
            down_ms: (60_000, 600_000),
            ..Config::default()
        },
        5,
    );
}
