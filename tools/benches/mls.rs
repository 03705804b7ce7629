//! MLS group and store benchmarks on Kith's own code: [`GroupEngine`] over the node's
//! redb-backed openmls provider ([`Store::provider`]), each operation followed by the
//! [`Store::commit_with`] the node makes for it, so every figure includes Kith's storage.
//!
//! Run everything: `cargo bench -p kith-tools --bench mls`. A subset: a criterion filter,
//! e.g. `cargo bench -p kith-tools --bench mls -- 'mls/encrypt'` or `-- '/500$'` or
//! `-- store/`. Results and how to read them: docs/BENCHMARKS.md.
//!
//! Group of N: member A (the engine under test) creates the group, N - 2 members that exist
//! only as key packages are added in one setup commit (plain openmls on A's provider; Kith
//! has no batch add of its own), then member B joins through Kith's invite path (a second
//! engine on its own store), so B can decrypt what A sends. All of that is setup, outside the
//! timed part.

#![allow(missing_docs)]

use std::cell::{Cell, RefCell};
use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use kith_node::store::{Batch, KithProvider, Store};
use kith_protocol::envelope::{
    JoinResponse, MAX_ENVELOPE_BYTES, MAX_JOIN_REQUEST_BYTES, MAX_JOIN_RESPONSE_BYTES, PayloadKind,
};
use kith_protocol::group::{CIPHERSUITE, Effect, GroupEngine, Identity, NewInvite};
use kith_protocol::ids::{GroupId, MessageId, hash_parts};
use kith_protocol::invite::Invite;
use kith_protocol::records::{EntryKind, HistoryEntry, StoredEnvelope};
use kith_protocol::{Keypair, PeerId};
use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::{BasicCredential, CredentialWithKey, KeyPackage, MlsGroup};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;
use openmls_traits::types::SignatureScheme;
use tempfile::TempDir;

/// 2026-01-01T00:00:00Z.
const T0: u64 = 1_767_225_600_000;
const NETWORK: &str = "bench";
const SIZES: &[usize] = &[10, 100, 500, 1000];
/// The encrypt + decrypt target is stated at 128 members.
const MESSAGE_SIZES: &[usize] = &[10, 100, 128, 500, 1000];
const TEXT_BYTES: usize = 1024;
/// Received messages per non-durable transaction in the batched store bench.
const BATCH: usize = 100;

fn key(seed: u64) -> Keypair {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_be_bytes());
    bytes[31] = 0x4b;
    Keypair::ed25519_from_bytes(bytes).expect("32 bytes is an ed25519 secret")
}

/// The openmls signer and credential Kith derives from a node key (as `Identity::new`).
fn mls_identity(k: &Keypair) -> (SignatureKeyPair, CredentialWithKey, PeerId) {
    let ed = k.clone().try_into_ed25519().expect("ed25519");
    let public = ed.public().to_bytes().to_vec();
    let signer = SignatureKeyPair::from_raw(
        SignatureScheme::ED25519,
        ed.secret().as_ref().to_vec(),
        public.clone(),
    );
    let peer = k.public().to_peer_id();
    let credential = CredentialWithKey {
        credential: BasicCredential::new(peer.to_bytes()).into(),
        signature_key: public.into(),
    };
    (signer, credential, peer)
}

/// Key packages of members that exist only for their leaves.
fn key_packages(from: u64, n: usize) -> (Vec<KeyPackage>, Vec<PeerId>) {
    let provider = OpenMlsRustCrypto::default();
    let mut kps = Vec::with_capacity(n);
    let mut peers = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let (signer, credential, peer) = mls_identity(&key(from + i));
        let bundle = KeyPackage::builder()
            .build(CIPHERSUITE, &provider, &signer, credential)
            .expect("key package");
        kps.push(bundle.key_package().clone());
        peers.push(peer);
    }
    (kps, peers)
}

struct Node {
    _dir: TempDir,
    store: Store,
    engine: GroupEngine<KithProvider>,
}

impl Node {
    fn new(seed: u64) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("kith.redb")).expect("store");
        let engine = GroupEngine::new(
            store.provider(),
            Identity::new(&key(seed)).expect("identity"),
            NETWORK,
        );
        Node {
            _dir: dir,
            store,
            engine,
        }
    }

    /// Persists an operation's staged MLS writes and records, as the node does.
    fn commit(&self, effects: &[Effect], durable: bool) {
        self.store
            .commit_with(Batch::from_effects(effects), durable)
            .expect("commit");
    }
}

fn publish(effects: &[Effect]) -> Vec<u8> {
    effects
        .iter()
        .find_map(|e| match e {
            Effect::Publish { data, .. } => Some(data.clone()),
            _ => None,
        })
        .expect("a publication")
}

/// A fresh joiner's request (the joiner's engine is dropped: only its key package matters).
fn fresh_request(invite: &Invite, seed: u64) -> (PeerId, kith_protocol::envelope::JoinRequest) {
    let mut j = Node::new(seed);
    let req = j.engine.prepare_join(invite, T0).expect("request");
    (j.engine.peer_id(), req)
}

struct Fixture {
    a: Node,
    b: Node,
    group: GroupId,
    invite: Invite,
}

impl Fixture {
    /// A group of `n` members (A, B and n - 2 key-package members).
    fn new(n: usize) -> Fixture {
        let mut a = Node::new(1);
        let b = Node::new(2);
        let group = GroupId(hash_parts(&[b"bench", &n.to_be_bytes()]));
        let fx = a.engine.create_group(group, "bench", T0).expect("create");
        a.commit(&fx, true);
        let (kps, _) = key_packages(1_000_000, n - 2);
        if !kps.is_empty() {
            let provider = a.store.provider();
            let (signer, _, _) = mls_identity(&key(1));
            let mls_id = openmls::group::GroupId::from_slice(group.as_bytes());
            let mut mls = MlsGroup::load(provider.storage(), &mls_id)
                .expect("load")
                .expect("group");
            mls.add_members(&provider, &signer, &kps).expect("bulk add");
            mls.merge_pending_commit(&provider).expect("merge");
            a.store.commit(Batch::default()).expect("commit");
            a.engine.reload_all().expect("reload");
        }
        let (invite, fx) = a
            .engine
            .create_invite(
                group,
                NewInvite {
                    addrs: Vec::new(),
                    secret: [7; 32],
                    expires_at: T0 / 1000 + 365 * 24 * 3600,
                    max_uses: 1000,
                    approval: false,
                },
                T0,
            )
            .expect("invite");
        a.commit(&fx, true);
        let mut f = Fixture {
            a,
            b,
            group,
            invite,
        };
        let (commit, welcome) = f.join_b();
        eprintln!(
            "sizes at {n} members: add commit envelope {commit} B (gossip limit \
             MAX_ENVELOPE_BYTES {MAX_ENVELOPE_BYTES} B), join response with Welcome {welcome} B \
             (MAX_JOIN_RESPONSE_BYTES {MAX_JOIN_RESPONSE_BYTES} B); join request limit \
             {MAX_JOIN_REQUEST_BYTES} B"
        );
        assert_eq!(f.a.engine.group(&group).expect("group").members.len(), n);
        f
    }

    /// B joins through A with the invite; returns (commit envelope bytes, join response bytes).
    fn join_b(&mut self) -> (usize, usize) {
        let req = self
            .b
            .engine
            .prepare_join(&self.invite, T0)
            .expect("join request");
        self.b.commit(&[], true);
        let (resp, fx) = self.add_one(self.b.engine.peer_id(), req);
        let commit = publish(&fx).len();
        let response = kith_protocol::codec::encode(&resp).expect("encode").len();
        let (_, fx) = self
            .b
            .engine
            .handle_join_response(&self.invite, resp, T0)
            .expect("joined");
        self.b.commit(&fx, true);
        (commit, response)
    }

    /// A answers a join request: the Add commit, merged and stored durably.
    fn add_one(
        &mut self,
        from: PeerId,
        req: kith_protocol::envelope::JoinRequest,
    ) -> (JoinResponse, Vec<Effect>) {
        let record = self.a.store.invite(&self.invite.id()).expect("read");
        let (resp, fx) = self
            .a
            .engine
            .handle_join_request(from, req, record, T0)
            .expect("add");
        assert!(
            matches!(
                resp,
                JoinResponse::Accepted { .. } | JoinResponse::Admitted { .. }
            ),
            "join refused"
        );
        self.a.commit(&fx, true);
        (resp, fx)
    }
}

fn text() -> String {
    "x".repeat(TEXT_BYTES)
}

fn bench_create(c: &mut Criterion) {
    let mut g = c.benchmark_group("mls");
    g.sample_size(20);
    let mut a = Node::new(1);
    let mut i = 0u64;
    g.bench_function("create", |bch| {
        bch.iter(|| {
            i += 1;
            let id = GroupId(hash_parts(&[b"create", &i.to_be_bytes()]));
            let fx = a.engine.create_group(id, "bench", T0).expect("create");
            a.commit(&fx, true);
        })
    });
    g.finish();
}

fn bench_messages(c: &mut Criterion) {
    let mut g = c.benchmark_group("mls");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    for &n in MESSAGE_SIZES {
        let mut f = Fixture::new(n);
        let group = f.group;
        let body = text();
        // Decrypt (first, so B is in step with A): B receives one of A's texts, committed without fsync (a received message).
        g.bench_function(format!("decrypt_1KiB/{n}"), |bch| {
            bch.iter_batched(
                || {
                    let (_, fx) = f.a.engine.send_text(group, &body, T0).expect("send");
                    f.a.commit(&fx, true);
                    publish(&fx)
                },
                |data| {
                    let (verdict, fx) = f.b.engine.handle_envelope(&data, T0);
                    assert!(
                        fx.iter().any(|e| matches!(e, Effect::Record(_))),
                        "not decrypted: {verdict:?}"
                    );
                    f.b.commit(&fx, false);
                    black_box(fx);
                },
                BatchSize::PerIteration,
            )
        });
        // Encrypt: A sends a 1 KiB text, committed durably (a sent message).
        g.bench_function(format!("encrypt_1KiB/{n}"), |bch| {
            bch.iter(|| {
                let (_, fx) = f.a.engine.send_text(group, &body, T0).expect("send");
                f.a.commit(&fx, true);
                black_box(fx);
            })
        });
        // The same without the fsync, to tell the MLS and storage work from the disk flush.
        g.bench_function(format!("encrypt_1KiB_no_fsync/{n}"), |bch| {
            bch.iter(|| {
                let (_, fx) = f.a.engine.send_text(group, &body, T0).expect("send");
                f.a.commit(&fx, false);
                black_box(fx);
            })
        });
    }
    g.finish();
}

/// Openmls' own add of `kps` on A's redb provider, merged and committed durably, then the
/// engine reloads the group (Kith has no batch add of its own).
fn openmls_add(f: &mut Fixture, kps: &[KeyPackage]) -> usize {
    let provider = f.a.store.provider();
    let (signer, _, _) = mls_identity(&key(1));
    let mut mls = load_mls(&provider, f.group);
    let (commit, _welcome, _) = mls.add_members(&provider, &signer, kps).expect("add");
    mls.merge_pending_commit(&provider).expect("merge");
    f.a.store.commit(Batch::default()).expect("commit");
    f.a.engine.reload_all().expect("reload");
    commit.tls_serialize_detached().expect("encode").len()
}

/// Openmls' own removal of the members whose signature keys are `keys` (setup only).
fn openmls_remove(f: &mut Fixture, keys: &[Vec<u8>]) {
    let provider = f.a.store.provider();
    let (signer, _, _) = mls_identity(&key(1));
    let mut mls = load_mls(&provider, f.group);
    let leaves: Vec<_> = mls
        .members()
        .filter(|m| keys.contains(&m.signature_key))
        .map(|m| m.index)
        .collect();
    mls.remove_members(&provider, &signer, &leaves)
        .expect("remove");
    mls.merge_pending_commit(&provider).expect("merge");
    f.a.store.commit(Batch::default()).expect("commit");
    f.a.engine.reload_all().expect("reload");
}

fn load_mls(provider: &KithProvider, group: GroupId) -> MlsGroup {
    let mls_id = openmls::group::GroupId::from_slice(group.as_bytes());
    MlsGroup::load(provider.storage(), &mls_id)
        .expect("load")
        .expect("group")
}

fn bench_commits(c: &mut Criterion) {
    let mut g = c.benchmark_group("mls");
    // Flat sampling with a tiny time budget: 10 samples of one operation each (plus one
    // warm-up), so the group size stays put and `cargo bench` ends in minutes. Each
    // operation's effect on the size is undone in the (untimed) setup of the next one.
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_millis(1))
        .warm_up_time(Duration::from_nanos(1));
    for &n in SIZES {
        let f = RefCell::new(Fixture::new(n));
        let group = f.borrow().group;
        let invite = f.borrow().invite.clone();
        let mut joiner = 2_000_000u64;
        // Add one (A answers a join request: Add commit + Welcome, merged, stored durably) to
        // a group of n; the setup removes the previous iteration's joiner.
        let added: Cell<Option<PeerId>> = Cell::new(None);
        g.bench_function(format!("add_one/{n}"), |bch| {
            bch.iter_batched(
                || {
                    if let Some(peer) = added.take() {
                        let mut f = f.borrow_mut();
                        let fx = f.a.engine.remove_member(group, peer, T0).expect("remove");
                        f.a.commit(&fx, true);
                    }
                    joiner += 1;
                    fresh_request(&invite, joiner)
                },
                |(from, req)| {
                    let out = f.borrow_mut().add_one(from, req);
                    added.set(Some(from));
                    black_box(out);
                },
                BatchSize::PerIteration,
            )
        });
        if let Some(peer) = added.take() {
            let mut f = f.borrow_mut();
            let fx = f.a.engine.remove_member(group, peer, T0).expect("remove");
            f.a.commit(&fx, true);
        }
        // Remove one from a group of n: the setup adds a joiner, the timed part removes it.
        g.bench_function(format!("remove/{n}"), |bch| {
            bch.iter_batched(
                || {
                    joiner += 1;
                    let (from, req) = fresh_request(&invite, joiner);
                    f.borrow_mut().add_one(from, req);
                    from
                },
                |peer| {
                    let f = &mut *f.borrow_mut();
                    let fx = f.a.engine.remove_member(group, peer, T0).expect("remove");
                    f.a.commit(&fx, true);
                    black_box(fx);
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_function(format!("self_update/{n}"), |bch| {
            bch.iter(|| {
                let f = &mut *f.borrow_mut();
                let fx = f.a.engine.self_update(group, T0).expect("update");
                f.a.commit(&fx, true);
                black_box(fx);
            })
        });
        // 50 at once to a group of n: see `openmls_add`; the setup removes the previous 50.
        let mut seed = 3_000_000u64;
        let mut last: Vec<Vec<u8>> = Vec::new();
        let mut commit_bytes = 0;
        g.bench_function(format!("add_50_openmls_on_kith_store/{n}"), |bch| {
            bch.iter_batched(
                || {
                    if !last.is_empty() {
                        openmls_remove(&mut f.borrow_mut(), &last);
                    }
                    seed += 50;
                    let kps = key_packages(seed, 50).0;
                    last = kps
                        .iter()
                        .map(|k| k.leaf_node().signature_key().as_slice().to_vec())
                        .collect();
                    kps
                },
                |kps| commit_bytes = openmls_add(&mut f.borrow_mut(), &kps),
                BatchSize::PerIteration,
            )
        });
        eprintln!("sizes at {n} members: commit adding 50 members {commit_bytes} B (plain MLS)");
    }
    g.finish();
}

fn stored(i: u64) -> (HistoryEntry, StoredEnvelope) {
    let group = GroupId([9; 32]);
    let id = MessageId(hash_parts(&[b"store-bench", &i.to_be_bytes()]));
    let entry = HistoryEntry {
        group,
        id,
        epoch: 1,
        sender: key(5).public().to_peer_id(),
        sent_at_ms: T0 + i,
        received_at_ms: T0 + i,
        kind: EntryKind::Text(text()),
    };
    let envelope = StoredEnvelope {
        id,
        group,
        epoch: 1,
        kind: PayloadKind::Application,
        bytes: vec![0x5a; TEXT_BYTES + 200],
        received_at_ms: T0 + i,
    };
    (entry, envelope)
}

fn bench_store(c: &mut Criterion) {
    let mut g = c.benchmark_group("store");
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("kith.redb")).expect("store");
    let mut i = 0u64;
    g.throughput(Throughput::Elements(1));
    g.bench_function("durable_append", |bch| {
        bch.iter(|| {
            i += 1;
            let (entry, envelope) = stored(i);
            store
                .commit_with(
                    Batch {
                        history: vec![entry],
                        envelopes: vec![envelope],
                        ..Batch::default()
                    },
                    true,
                )
                .expect("commit");
        })
    });
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function(format!("batched_append_{BATCH}"), |bch| {
        bch.iter(|| {
            let mut batch = Batch::default();
            for _ in 0..BATCH {
                i += 1;
                let (entry, envelope) = stored(i);
                batch.history.push(entry);
                batch.envelopes.push(envelope);
            }
            store.commit_with(batch, false).expect("commit");
        })
    });
    g.finish();
}

/// Sealing and opening one gossip frame of a 1 KiB text's envelope (what the network task
/// adds to every message it sends and receives).
fn bench_seal(c: &mut Criterion) {
    use kith_protocol::envelope::Envelope;
    use kith_protocol::seal::{SealKey, open, open_envelope, seal};
    let mut g = c.benchmark_group("seal");
    g.sample_size(50)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    // A 1 KiB text's envelope is ~1.2 KB: padded to the 2 KiB bucket.
    let group = GroupId([7; 32]);
    let key = SealKey::of("bench", &group);
    let (envelope, _) = Envelope::new(group, 3, PayloadKind::Application, vec![0x5a; 1160])
        .encode()
        .expect("encode");
    let frame = seal(&key, &envelope).expect("seal");
    g.throughput(Throughput::Bytes(envelope.len() as u64));
    g.bench_function("seal_1200B", |b| {
        b.iter(|| black_box(seal(&key, black_box(&envelope)).expect("seal")))
    });
    g.bench_function("open_1200B", |b| {
        b.iter(|| black_box(open(&key, black_box(&frame)).expect("open")))
    });
    // What the network task runs: open, then check the envelope is of the topic's group.
    g.bench_function("open_envelope_1200B", |b| {
        b.iter(|| black_box(open_envelope(&key, "bench", black_box(&frame)).expect("open")))
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_seal,
    bench_store,
    bench_create,
    bench_messages,
    bench_commits
);
criterion_main!(benches);
