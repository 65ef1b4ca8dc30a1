//! Login throttling. Failed logins are counted per (account, address) and
//! per address: past a few failures the answer is delayed, growing with each
//! one; past more, logins for that account from that address (or from that
//! address at all) are refused for a while with a reason that says so.
//! Other addresses are never slowed, so an attacker cannot lock the real
//! user out from elsewhere, and every lockout ends by itself. The tables
//! are bounded; the oldest entries make room, and no entry holds more than
//! a short key: a name longer than any username is kept as its start and a
//! keyed hash. An IPv6 client is counted by its /64, the block one host or
//! one customer usually holds, so that a host cannot step past its limit by
//! changing the low bits of its address.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Settings of the throttle.
#[derive(Debug, Clone)]
pub struct ThrottleSettings {
    /// Failures of one account from one address before answers slow down.
    pub free_failures: u32,
    /// Failures of one account from one address before it is locked out.
    pub account_lockout: u32,
    /// Failures from one address (any account) before it is locked out.
    pub address_lockout: u32,
    /// How long failures are remembered, and how long a lockout lasts.
    pub window: Duration,
    /// Longest delay before a failure answer.
    pub max_delay: Duration,
    /// Most (account, address) and address entries kept.
    pub max_entries: usize,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        ThrottleSettings {
            free_failures: 3,
            account_lockout: 10,
            address_lockout: 50,
            window: Duration::from_secs(15 * 60),
            max_delay: Duration::from_secs(4),
            max_entries: 100_000,
        }
    }
}

/// What to do with a login attempt before checking it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    Allow,
    /// Refused without checking; the reason says why.
    Refuse(String),
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

#[derive(Default)]
struct Tables {
    by_account: HashMap<(String, IpAddr), Failures>,
    by_address: HashMap<IpAddr, Failures>,
}

/// The address that limits and throttles count by: an IPv4 address (also
/// one mapped into IPv6) as it is, an IPv6 address as its /64.
pub fn address_block(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// Names up to this many bytes are kept as they are (every valid username
/// is); longer ones as their start and a hash.
const KEPT_NAME_BYTES: usize = crate::proto::names::MAX_USERNAME;

/// Shared by both protocols.
pub struct LoginThrottle {
    settings: ThrottleSettings,
    tables: Mutex<Tables>,
    /// Keyed per process, so that no one can choose names that collide.
    hasher: RandomState,
}

impl LoginThrottle {
    pub fn new(settings: ThrottleSettings) -> LoginThrottle {
        LoginThrottle {
            settings,
            tables: Mutex::new(Tables::default()),
            hasher: RandomState::new(),
        }
    }

    /// The table key of an attempt: at most about 100 bytes of name, and
    /// the address block. A shortened name contains `…`, which no username
    /// does, so it never stands for a real account.
    fn key(&self, user: &str, addr: IpAddr) -> (String, IpAddr) {
        let addr = address_block(addr);
        if user.len() <= KEPT_NAME_BYTES {
            return (user.to_owned(), addr);
        }
        let mut start = KEPT_NAME_BYTES / 2;
        while !user.is_char_boundary(start) {
            start -= 1;
        }
        let hash = self.hasher.hash_one(user);
        (format!("{}…{hash:016x}", &user[..start]), addr)
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self, failures: Option<&Failures>, now: Instant) -> u32 {
        failures
            .filter(|f| now.duration_since(f.last) < self.settings.window)
            .map_or(0, |f| f.count)
    }

    /// Whether to check this attempt at all.
    pub fn gate(&self, user: &str, addr: IpAddr) -> Gate {
        let now = Instant::now();
        let key = self.key(user, addr);
        let tables = self.tables();
        if self.live(tables.by_address.get(&key.1), now) >= self.settings.address_lockout {
            return Gate::Refuse(
                "too many failed logins from your address; try again later".into(),
            );
        }
        if self.live(tables.by_account.get(&key), now) >= self.settings.account_lockout {
            return Gate::Refuse(
                "too many failed logins for this account from your address; try again later".into(),
            );
        }
        Gate::Allow
    }

    /// Records a failure; returns how long to wait before answering.
    pub fn failed(&self, user: &str, addr: IpAddr) -> Duration {
        let now = Instant::now();
        let window = self.settings.window;
        let key = self.key(user, addr);
        let block = key.1;
        let mut tables = self.tables();
        let bump = |entry: &mut Failures| {
            if now.duration_since(entry.last) >= window {
                entry.count = 0;
            }
            entry.count += 1;
            entry.last = now;
            entry.count
        };
        let fresh = Failures {
            count: 0,
            last: now,
        };
        let count = bump(tables.by_account.entry(key).or_insert(fresh));
        bump(tables.by_address.entry(block).or_insert(fresh));
        let max = self.settings.max_entries;
        evict_oldest(&mut tables.by_account, max);
        evict_oldest(&mut tables.by_address, max);
        let over = count.saturating_sub(self.settings.free_failures);
        if over == 0 {
            Duration::ZERO
        } else {
            (Duration::from_millis(250) * 2u32.saturating_pow(over.min(8) - 1))
                .min(self.settings.max_delay)
        }
    }

    /// A success clears that account's failures from that address.
    pub fn succeeded(&self, user: &str, addr: IpAddr) {
        let key = self.key(user, addr);
        self.tables().by_account.remove(&key);
    }
}

/// Keeps a table within `max` entries by dropping the least recent tenth.
fn evict_oldest<K: Clone + Eq + std::hash::Hash>(table: &mut HashMap<K, Failures>, max: usize) {
    if table.len() <= max {
        return;
    }
    let mut ages: Vec<(Instant, K)> = table.iter().map(|(k, f)| (f.last, k.clone())).collect();
    ages.sort_by_key(|(last, _)| *last);
    for (_, key) in ages.into_iter().take(max / 10 + 1) {
        table.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn delays_grow_then_the_account_is_refused_from_that_address_only() {
        let throttle = LoginThrottle::new(ThrottleSettings::default());
        let delays: Vec<Duration> = (0..10).map(|_| throttle.failed("alice", ip(1))).collect();
        assert_eq!(delays[..3], [Duration::ZERO; 3]);
        assert_eq!(delays[3], Duration::from_millis(250));
        assert_eq!(delays[4], Duration::from_millis(500));
        assert_eq!(delays[9], Duration::from_secs(4));
        assert!(matches!(throttle.gate("alice", ip(1)), Gate::Refuse(_)));
        assert_eq!(
            throttle.gate("alice", ip(2)),
            Gate::Allow,
            "other addresses are not locked out"
        );
        assert_eq!(
            throttle.gate("bob", ip(1)),
            Gate::Allow,
            "other accounts are not locked out"
        );
    }

    #[test]
    fn an_address_failing_on_many_accounts_is_refused() {
        let throttle = LoginThrottle::new(ThrottleSettings::default());
        for n in 0..50 {
            throttle.failed(&format!("user{n}"), ip(3));
        }
        assert!(matches!(throttle.gate("anyone", ip(3)), Gate::Refuse(_)));
        assert_eq!(throttle.gate("anyone", ip(4)), Gate::Allow);
    }

    #[test]
    fn lockouts_end_and_success_clears() {
        let settings = ThrottleSettings {
            window: Duration::from_millis(50),
            ..ThrottleSettings::default()
        };
        let throttle = LoginThrottle::new(settings);
        for _ in 0..10 {
            throttle.failed("alice", ip(1));
        }
        assert!(matches!(throttle.gate("alice", ip(1)), Gate::Refuse(_)));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(throttle.gate("alice", ip(1)), Gate::Allow);
        throttle.failed("bob", ip(1));
        throttle.succeeded("bob", ip(1));
        assert_eq!(throttle.failed("bob", ip(1)), Duration::ZERO);
    }

    #[test]
    fn long_names_are_kept_short_and_still_throttled() {
        let throttle = LoginThrottle::new(ThrottleSettings::default());
        let long = "é".repeat(30_000);
        let other = format!("{long}x");
        for _ in 0..10 {
            throttle.failed(&long, ip(1));
        }
        throttle.failed(&other, ip(1));
        assert!(matches!(throttle.gate(&long, ip(1)), Gate::Refuse(_)));
        assert_eq!(throttle.gate(&other, ip(1)), Gate::Allow, "its own entry");
        let tables = throttle.tables();
        assert_eq!(tables.by_account.len(), 2);
        assert!(
            tables.by_account.keys().all(|(name, _)| name.len() <= 100),
            "no entry holds the whole name"
        );
    }

    #[test]
    fn an_ipv6_slash_64_counts_as_one_address() {
        let throttle = LoginThrottle::new(ThrottleSettings::default());
        let host = |low: u16| IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, low]);
        for n in 0..50u16 {
            throttle.failed(&format!("user{n}"), host(n + 1));
        }
        assert!(matches!(
            throttle.gate("anyone", host(999)),
            Gate::Refuse(_)
        ));
        let next_block = IpAddr::from([0x2001, 0xdb8, 0, 2, 0, 0, 0, 1]);
        assert_eq!(throttle.gate("anyone", next_block), Gate::Allow);
        assert_eq!(
            address_block("::ffff:10.0.0.1".parse().unwrap()),
            ip(1),
            "IPv4 mapped into IPv6 is IPv4"
        );
    }

    #[test]
    fn tables_stay_bounded() {
        let settings = ThrottleSettings {
            max_entries: 100,
            ..ThrottleSettings::default()
        };
        let throttle = LoginThrottle::new(settings);
        for n in 0..1000u32 {
            throttle.failed(&format!("u{n}"), IpAddr::from(n.to_be_bytes()));
        }
        let tables = throttle.tables();
        assert!(tables.by_account.len() <= 100 && tables.by_address.len() <= 100);
    }
}
