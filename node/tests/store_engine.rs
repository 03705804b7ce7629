//! The protocol's standard three-member run, on the redb store instead of openmls' memory
//! storage, persisting every effect exactly as the node does; then every member reopens its
//! database from disk and the group carries on.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use kith_node::store::{Batch, Store};
use kith_protocol::group::Effect;
use kith_protocol::records::EntryKind;
use kith_protocol::testing::{Sim, three_member_run};

fn open_all(paths: &[PathBuf]) -> Vec<Store> {
    paths.iter().map(|p| Store::open(p).unwrap()).collect()
}

fn persist(stores: &[Store]) -> kith_protocol::testing::Hook<'_, kith_node::store::KithProvider> {
    Box::new(move |i, _engine, effects: &[Effect]| {
        stores[i].commit(Batch::from_effects(effects)).unwrap();
        assert!(
            !stores[i].has_staged(),
            "every MLS write is committed with its effects"
        );
    })
}

#[test]
fn three_member_run_on_redb_then_everyone_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = (0..3)
        .map(|i| dir.path().join(format!("m{i}.redb")))
        .collect();

    let group = {
        let stores = open_all(&paths);
        let mut sim = Sim::new(
            stores.iter().map(Store::provider).collect(),
            "net",
            persist(&stores),
        );
        let g = three_member_run(&mut sim);
        assert!(sim.in_flight.is_empty());
        g
    }; // every engine, provider and store dropped: the files are closed

    // Reopen from disk: each member finds its group, epoch, members and history.
    let stores = open_all(&paths);
    for s in &stores {
        let texts: Vec<String> = s
            .history(&group, 100)
            .unwrap()
            .into_iter()
            .filter_map(|h| match h.kind {
                EntryKind::Text(t) | EntryKind::Post { text: t, .. } => Some(t),
                _ => None,
            })
            .collect();
        assert_eq!(texts.len(), 3, "{texts:?}");
        assert_eq!(s.groups().unwrap().len(), 1);
    }
    let mut sim = Sim::new(
        stores.iter().map(Store::provider).collect(),
        "net",
        persist(&stores),
    );
    for (i, s) in stores.iter().enumerate() {
        let (effects, missing) = sim.engines[i].load(s.groups().unwrap()).unwrap();
        assert!(missing.is_empty());
        sim.apply(i, effects);
        let view = sim.engines[i].group(&group).unwrap();
        assert_eq!(view.epoch, 2);
        assert_eq!(view.members.len(), 3);
    }
    let auth = sim.engines[0].epoch_authenticator(&group);
    assert!(auth.is_some());
    for i in 1..3 {
        assert_eq!(sim.engines[i].epoch_authenticator(&group), auth);
    }
    // The conversation continues in the current epoch after the restart.
    for i in 0..3 {
        sim.send(i, group, &format!("after restart {i}")).unwrap();
    }
    sim.deliver_all();
    for i in 0..3 {
        let got: Vec<String> = sim.texts(i, group);
        for j in (0..3).filter(|j| *j != i) {
            assert!(
                got.contains(&format!("after restart {j}")),
                "member {i}: {got:?}"
            );
        }
    }
    for (i, s) in stores.iter().enumerate() {
        let n = s
            .history(&group, 100)
            .unwrap()
            .iter()
            .filter(|h| h.kind.text().is_some())
            .count();
        assert_eq!(n, 6, "member {i} has all six texts on disk");
    }
}

#[test]
fn non_durable_commits_are_visible_at_once_and_durable_after_flush() {
    use kith_protocol::ids::{GroupId, MessageId};
    use kith_protocol::records::HistoryEntry;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let group = GroupId([5; 32]);
    let entry = |n: u8| HistoryEntry {
        group,
        id: MessageId([n; 32]),
        epoch: 0,
        sender: kith_protocol::testing::member_key(0).public().to_peer_id(),
        sent_at_ms: 1,
        received_at_ms: 2,
        kind: EntryKind::Text(format!("m{n}")),
    };
    {
        let store = Store::open(&path).unwrap();
        let batch = |n| Batch {
            history: vec![entry(n)],
            ..Batch::default()
        };
        store.commit_with(batch(1), false).unwrap();
        store.commit_with(batch(2), false).unwrap();
        // Visible to readers before any fsync.
        assert_eq!(store.history(&group, 10).unwrap().len(), 2);
        assert!(store.has_message(&MessageId([2; 32])).unwrap());
        store.flush().unwrap();
    }
    let store = Store::open(&path).unwrap();
    let texts: Vec<_> = store
        .history(&group, 10)
        .unwrap()
        .into_iter()
        .map(|h| h.kind)
        .collect();
    assert_eq!(
        texts,
        vec![EntryKind::Text("m1".into()), EntryKind::Text("m2".into())]
    );
}

/// Two members on redb; member 1 was away (or lost gossip) for `missed` of member 0's
/// messages, and then gets `later` live ones.
fn gap_run(
    missed: usize,
    later: usize,
    hold: bool,
) -> (Vec<Store>, tempfile::TempDir, kith_protocol::ids::GroupId) {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = (0..2)
        .map(|i| dir.path().join(format!("m{i}.redb")))
        .collect();
    let stores = open_all(&paths);
    let group = {
        let mut sim = Sim::new(
            stores.iter().map(Store::provider).collect(),
            "net",
            persist(&stores),
        );
        let g = sim.create_group(0, "gap").unwrap();
        let inv = sim.invite(0, g, 1).unwrap();
        sim.deliver_all();
        sim.join(1, 0, &inv).unwrap();
        sim.deliver_all();
        if hold {
            sim.send(0, g, "first").unwrap();
            sim.deliver_all();
        }
        for k in 0..missed {
            sim.send(0, g, &format!("missed {k}")).unwrap();
        }
        sim.in_flight.clear();
        for k in 0..later {
            sim.send(0, g, &format!("later {k}")).unwrap();
        }
        sim.deliver_all();
        sim.sync_from(1, 0, g);
        g
    };
    (stores, dir, group)
}

fn texts(store: &Store, group: &kith_protocol::ids::GroupId) -> usize {
    store
        .history(group, 10_000)
        .unwrap()
        .into_iter()
        .filter(|h| h.kind.text().is_some())
        .count()
}

#[test]
fn a_gap_on_redb_is_held_undone_and_filled() {
    // The undo goes through the node's staged-write journal, not a memory snapshot.
    let (stores, _dir, g) = gap_run(80, 300, true);
    assert!(stores[1].undecryptable_counts(&g).unwrap().is_empty());
    assert_eq!(texts(&stores[1], &g), 381);
    assert_eq!(texts(&stores[0], &g), 381);
}

#[test]
fn what_cannot_be_decrypted_is_kept_and_counted_once() {
    // No position known before the newest message: the older ones beyond the MLS window
    // are lost, and the store says so (once per envelope, whatever comes again).
    let (stores, _dir, g) = gap_run(100, 1, false);
    let counts = stores[1].undecryptable_counts(&g).unwrap();
    assert_eq!(
        counts.get(&kith_protocol::order::Undecryptable::TooOld),
        Some(&37),
        "{counts:?}"
    );
    assert_eq!(texts(&stores[1], &g), 101 - 37);
}
