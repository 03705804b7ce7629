//! What a run simulates ([`Config`]), its seeded randomness ([`Rng`]) and what it counts
//! ([`Stats`]).

/// splitmix64: small, fast, and the same on every platform.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5EED_0FC0_FFEE)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 if `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, (lo, hi): (u64, u64)) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// What one run simulates.
#[derive(Debug, Clone)]
pub struct Config {
    /// Members of the group (node 0 creates it and adds the others).
    pub members: usize,
    /// Nodes that join by invite link during the faults (after the members).
    pub joiners: usize,
    /// Uses of the invite the joiners share.
    pub invite_uses: u32,
    /// Pause between two joiners' starts, ms; `None`: each starts at a random time during
    /// the faults (so joins race).
    pub join_every_ms: Option<(u64, u64)>,
    /// Nodes outside the group that receive all gossip anyway.
    pub strangers: usize,
    /// Texts sent during the faults.
    pub messages: usize,
    /// Which members send them (chosen at random for each).
    pub senders: Vec<usize>,
    /// Pause between two sends, ms.
    pub send_every_ms: (u64, u64),
    /// Commits (key updates) by member 0 during the faults.
    pub commits: usize,
    /// Gossip latency, ms.
    pub latency_ms: (u64, u64),
    /// Probability that one gossip delivery is lost.
    pub drop: f64,
    /// Probability that one gossip delivery arrives twice.
    pub duplicate: f64,
    /// Probability that a sync request is refused as rate-limited.
    pub rate_limited: f64,
    /// Members that may crash.
    pub crashable: Vec<usize>,
    /// Crashes during the faults.
    pub crashes: usize,
    /// How long a crashed node stays down, ms.
    pub down_ms: (u64, u64),
    /// Partitions during the faults.
    pub partitions: usize,
    /// How long a partition lasts, ms.
    pub partition_ms: (u64, u64),
    /// Fixed crash windows: (member, down at, up at), ms after the faults start.
    pub outages: Vec<(usize, u64, u64)>,
    /// Fixed partitions: (members cut off, from, to), ms after the faults start.
    pub cuts: Vec<(Vec<usize>, u64, u64)>,
    /// How long the world runs on after the faults stop, ms.
    pub settle_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            members: 3,
            joiners: 0,
            invite_uses: 1,
            join_every_ms: None,
            strangers: 0,
            messages: 20,
            senders: vec![0],
            send_every_ms: (50, 500),
            commits: 0,
            latency_ms: (5, 150),
            drop: 0.0,
            duplicate: 0.0,
            rate_limited: 0.0,
            crashable: Vec::new(),
            crashes: 0,
            down_ms: (1_000, 30_000),
            partitions: 0,
            partition_ms: (1_000, 60_000),
            outages: Vec::new(),
            cuts: Vec::new(),
            settle_ms: 10 * 60_000,
        }
    }
}

/// What happened in a run, for the test output.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Events handled.
    pub events: u64,
    /// Gossip deliveries made / lost.
    pub gossip: u64,
    /// Gossip deliveries lost.
    pub dropped: u64,
    /// Sync requests answered.
    pub requests: u64,
    /// Crashes.
    pub crashes: u64,
    /// Texts sent.
    pub sent: u64,
    /// Virtual time at the end, ms.
    pub virtual_ms: u64,
    /// Joins started (first tries and tries again).
    pub join_attempts: u64,
    /// Joins that found nobody or timed out, and were tried again.
    pub join_retries: u64,
    /// Members added by a member (joins and rejoins).
    pub admitted: u64,
    /// Joins whose Add lost a race.
    pub join_lost: u64,
    /// Deep forks lost by a member.
    pub deep_forks: u64,
    /// Members added again after a deep fork.
    pub rejoined: u64,
}
