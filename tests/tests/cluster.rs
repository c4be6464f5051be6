//! Three-node cluster tests: real `troupe node` processes joined by ractor_cluster on
//! loopback ports, one real nats-server holding the log and the leases, SIGKILL and
//! SIGSTOP of a node, a wrong cookie; checks by event id that nothing acknowledged is
//! lost or applied twice. The tests run one at a time; every wait polls with a deadline.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use troupe_tests::nats::NatsCluster;
use troupe_tests::{acked_rows, free_port, start_loader, timed, write_events, Node};

const PARTITIONS: u32 = 6;
const NAMES: [&str; 3] = ["a", "b", "c"];

static CLUSTER_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    CLUSTER_TESTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Ports of one member: (name, cluster port, http port).
type Member = (&'static str, u16, u16);

/// Log and lease settings that differ between tests.
#[derive(Clone)]
struct Tuning {
    /// Extra lines of `[log.jetstream]`.
    jetstream: String,
    lease_period_ms: u64,
    lease_renew_ms: u64,
    /// Hold-down of a member after a lapse (short by default: most tests restart or
    /// resume nodes and wait for them to get partitions back).
    hold_down_ms: u64,
    /// Extra lines of `[journal]`.
    journal: String,
    /// Members configured with `trainer = false`.
    no_trainer: Vec<&'static str>,
    /// Extra lines of `[http]` (tokens).
    http: String,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            jetstream: String::new(),
            lease_period_ms: 3000,
            lease_renew_ms: 500,
            hold_down_ms: 1000,
            journal: String::new(),
            no_trainer: Vec::new(),
            http: String::new(),
        }
    }
}

/// Node `name`'s config with the members `members` listed; `own` is its own entry, given
/// as `advertise` when `members` does not list it (a member the others discover).
fn config(
    name: &str,
    dir: &std::path::Path,
    members: &[Member],
    own: Member,
    nats: &str,
    t: &Tuning,
) -> String {
    let http = own.2;
    let advertise = if members.iter().any(|m| m.0 == name) {
        String::new()
    } else {
        format!(
            "advertise = {{ cluster_addr = \"127.0.0.1:{}\", http_addr = \"127.0.0.1:{}\" }}\n",
            own.1, own.2
        )
    };
    let list: Vec<String> = members
        .iter()
        .map(|(n, c, h)| {
            let trainer = if t.no_trainer.contains(n) { ", trainer = false" } else { "" };
            format!("{{ name = \"{n}\", cluster_addr = \"127.0.0.1:{c}\", http_addr = \"127.0.0.1:{h}\"{trainer} }}")
        })
        .collect();
    format!(
        "[node]\nname = \"{name}\"\ndata_dir = \"{}\"\n[http]\naddr = \"127.0.0.1:{http}\"\n{}\
[journal]\npartitions = {PARTITIONS}\npoll_interval_ms = 20\n{}\
[features]\nhistory_len = 100000\ncheckpoint_every_records = 700\ncheckpoint_interval_ms = 300\n\
[als]\nmin_interactions = 1000000000\n\
[supervision]\nbackoff_base_ms = 5\nbackoff_max_ms = 50\n\
[log]\nbackend = \"jetstream\"\n[log.jetstream]\nurl = \"{nats}\"\n{}\
[cluster]\nmembers = [{}]\n{advertise}heartbeat_ms = 200\nheartbeat_misses = 3\nhandshake_timeout_ms = 2000\n\
reconnect_max_ms = 1000\nlease_period_ms = {}\nlease_renew_ms = {}\nrebalance_interval_ms = 200\n\
forward_timeout_ms = 3000\nmember_hold_down_ms = {}\nmember_hold_down_max_ms = {}\n",
        dir.join("data").display(),
        t.http,
        t.journal,
        t.jetstream,
        list.join(", "),
        t.lease_period_ms,
        t.lease_renew_ms,
        t.hold_down_ms,
        t.hold_down_ms * 8,
    )
}

struct Cluster {
    root: tempfile::TempDir,
    members: Vec<Member>,
    nodes: Vec<Node>,
    /// One server, or three forming a JetStream cluster.
    nats: NatsCluster,
    tuning: Tuning,
    /// Appended to every node's config (fault injection: sets TROUPE_ALLOW_FAULTS).
    extra: String,
    /// Appended to one node's config (faults of that node only).
    node_extra: Vec<(&'static str, String)>,
}

impl Cluster {
    /// The server and the member ports; no node started yet.
    fn prepare() -> Option<Cluster> {
        Some(Cluster::on(NatsCluster::one()?, Tuning::default()))
    }

    /// The member ports for nodes using `nats` with `tuning`; no node started yet.
    fn on(nats: NatsCluster, tuning: Tuning) -> Cluster {
        Cluster::on_names(nats, tuning, &NAMES)
    }

    /// As [`Cluster::on`] with the members `names`.
    fn on_names(nats: NatsCluster, tuning: Tuning, names: &[&'static str]) -> Cluster {
        let members: Vec<Member> = names
            .iter()
            .map(|&n| (n, free_port(), free_port()))
            .collect();
        Cluster {
            root: tempfile::tempdir().unwrap(),
            members,
            nodes: Vec::new(),
            nats,
            tuning,
            extra: String::new(),
            node_extra: Vec::new(),
        }
    }

    /// Starts node `name` seeing the members as `view` and the server at `nats`.
    fn launch(&mut self, name: &'static str, cookie: &str, view: &[Member], nats: &str) {
        let dir = self.root.path().join(name);
        let entry = *self.members.iter().find(|m| m.0 == name).unwrap();
        let http = entry.2;
        let own: String = self
            .node_extra
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, e)| e.as_str())
            .collect();
        let text = format!(
            "{}{}{own}",
            config(name, &dir, view, entry, nats, &self.tuning),
            self.extra
        );
        let mut env = vec![("TROUPE_CLUSTER_COOKIE", cookie)];
        if !self.extra.is_empty() || !own.is_empty() {
            env.push(("TROUPE_ALLOW_FAULTS", "1"));
        }
        self.nodes.push(Node::start_config(&dir, http, &text, &env));
    }

    /// Starts the server and the nodes named in `start` (cookie per node from `cookie`).
    fn start(start: &[&'static str], cookie: impl Fn(&str) -> &'static str) -> Option<Cluster> {
        let mut c = Cluster::prepare()?;
        let (members, url) = (c.members.clone(), c.nats.urls());
        for &n in start {
            c.launch(n, cookie(n), &members, &url);
        }
        Some(c)
    }

    /// Three nodes with one cookie, waited for until the partitions are balanced.
    fn balanced_three() -> Option<Cluster> {
        let c = Cluster::start(&NAMES, |_| "test-cookie")?;
        c.wait(60, "partitions balanced over the three nodes", || {
            balanced(&c)
        });
        Some(c)
    }

    /// The three members on `nats` with `tuning`, started and balanced.
    fn balanced_on(nats: NatsCluster, tuning: Tuning) -> Cluster {
        let mut c = Cluster::on(nats, tuning);
        c.launch_balanced(90);
        c
    }

    /// Starts the three members as prepared (with their `node_extra`) and waits up to
    /// `secs` for the partitions to be balanced over them.
    fn launch_balanced(&mut self, secs: u64) {
        let (members, url) = (self.members.clone(), self.nats.urls());
        for n in NAMES {
            self.launch(n, "test-cookie", &members, &url);
        }
        self.wait(secs, "partitions balanced over the three nodes", || {
            balanced(self)
        });
    }

    /// Starts the three members (with this cluster's tuning and extras) and waits until
    /// the partitions are balanced over them.
    fn launch_all_balanced(&mut self) {
        let (members, url) = (self.members.clone(), self.nats.urls());
        for n in NAMES {
            self.launch(n, "test-cookie", &members, &url);
        }
        self.wait(60, "partitions balanced over the three nodes", || {
            balanced(self)
        });
    }

    /// A member's cluster address.
    fn cluster_addr(&self, name: &str) -> std::net::SocketAddr {
        let (_, port, _) = *self.members.iter().find(|m| m.0 == name).unwrap();
        std::net::SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn node(&self, name: &str) -> &Node {
        let i = self
            .nodes
            .iter()
            .position(|n| n.config.parent().unwrap().ends_with(name))
            .unwrap();
        &self.nodes[i]
    }

    fn node_mut(&mut self, name: &str) -> &mut Node {
        let i = self
            .nodes
            .iter()
            .position(|n| n.config.parent().unwrap().ends_with(name))
            .unwrap();
        &mut self.nodes[i]
    }

    /// Prints every node's log tail and cluster view, then panics.
    fn fail(&self, what: &str) -> ! {
        for n in &self.nodes {
            let log = n.log(n.starts);
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- {} (log, newest first):\n{}",
                n.config.display(),
                tail.join("\n")
            );
            if let Some(c) = try_cluster(n) {
                eprintln!("cluster view: {c}");
            }
        }
        panic!("{what}");
    }

    fn wait(&self, secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if cond() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.fail(&format!("timed out after {secs} s waiting for: {what}"));
    }
}

fn try_cluster(n: &Node) -> Option<Value> {
    let r = std::panic::catch_unwind(|| n.get("/v1/cluster")).ok()?;
    (r.status == 200).then(|| r.body["cluster"].clone())
}

/// Partitions `node` itself serves.
fn serving(n: &Node) -> BTreeSet<u64> {
    try_cluster(n)
        .and_then(|c| {
            c["partitions"].as_array().map(|ps| {
                ps.iter()
                    .filter(|p| p["state"] == "serving")
                    .filter_map(|p| p["partition"].as_u64())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Owner of every partition as `node` sees it.
fn owners(n: &Node) -> Vec<String> {
    try_cluster(n)
        .and_then(|c| {
            c["partitions"].as_array().map(|ps| {
                ps.iter()
                    .map(|p| p["owner"].as_str().unwrap_or("").to_string())
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn member_state(n: &Node, peer: &str) -> (String, String) {
    try_cluster(n)
        .and_then(|c| {
            c["members"]
                .as_array()?
                .iter()
                .find(|m| m["name"] == peer)
                .map(|m| {
                    (
                        m["state"].as_str().unwrap_or("").to_string(),
                        m["error"].as_str().unwrap_or("").to_string(),
                    )
                })
        })
        .unwrap_or_default()
}

/// True when the nodes in `names` together serve every partition, each exactly once.
fn all_served_by(c: &Cluster, names: &[&str]) -> bool {
    let mut count: HashMap<u64, usize> = HashMap::new();
    for n in names {
        for p in serving(c.node(n)) {
            *count.entry(p).or_default() += 1;
        }
    }
    (0..PARTITIONS as u64).all(|p| count.get(&p) == Some(&1))
}

/// Every partition served once and every node serving some (with these names and six
/// partitions the rendezvous choice gives each node at least one).
/// Every node's view of the owners agrees with who serves what.
fn balanced(c: &Cluster) -> bool {
    let by = served_by(c, &NAMES);
    all_served_by(c, &NAMES)
        && NAMES.iter().all(|n| !serving(c.node(n)).is_empty())
        && NAMES.iter().all(|n| {
            let view = owners(c.node(n));
            view.len() == PARTITIONS as usize
                && view
                    .iter()
                    .enumerate()
                    .all(|(p, o)| by.get(&(p as u64)).is_some_and(|w| w == &vec![o.clone()]))
        })
}

/// item -> times it appears in users' histories, read through `node` (users of
/// partitions it does not own are read from their owners).
fn applied_items(node: &Node, users: usize) -> Option<HashMap<String, usize>> {
    let mut seen = HashMap::new();
    for u in 0..users {
        let r = node.get(&format!("/v1/users/u{u}"));
        match r.status {
            404 => continue,
            200 => {}
            _ => return None,
        }
        for h in r.body["history"].as_array()? {
            *seen.entry(h["item"].as_str()?.to_string()).or_insert(0) += 1;
        }
    }
    Some(seen)
}

/// Waits until every acked event (each names its own item) is in some user's history,
/// read through `via` (other partitions forwarded to their owners), then checks each is
/// there exactly once and nothing else is.
fn assert_applied_once(c: &Cluster, via: &str, acked: &[String], users: usize) {
    let n = acked.len();
    c.wait(90, "every event applied", || {
        applied_items(c.node(via), users).is_some_and(|m| m.len() >= n)
    });
    let applied = applied_items(c.node(via), users).unwrap();
    let wrong: Vec<&String> = acked
        .iter()
        .filter(|i| applied.get(*i) != Some(&1))
        .take(5)
        .collect();
    assert!(
        wrong.is_empty(),
        "acked events missing or applied twice: {wrong:?}"
    );
    assert_eq!(applied.len(), n, "events applied that were not acked");
}

/// Items the node's ItemStats counted (every node runs its own from the shared log).
fn items_counted(n: &Node) -> u64 {
    n.get("/v1/cluster").body["actors"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == "item_stats"))
        .and_then(|x| x["state"]["items"].as_u64())
        .unwrap_or(0)
}

/// On three servers with replicas 3, SIGKILL one of three nodes while events stream in
/// through the other two and queries go to them: its partitions move to the survivors
/// (the time is printed), every query is answered (degraded allowed, no 5xx), the
/// partitions come back when it restarts, and every acknowledged event is applied
/// exactly once (by event id across all users, read through one node) and counted once
/// per item by every node's item stats.
#[test]
fn cluster_kill9_of_a_node_under_load_moves_its_partitions_and_loses_nothing() {
    let _serial = one_at_a_time();
    let _t = timed();
    // Three servers, everything replicated three times.
    let Some(nats) = NatsCluster::start() else {
        return;
    };
    let mut c = Cluster::balanced_on(nats, r3_tuning());
    let (n, users) = (4_000usize, 40usize);
    let root = c.root.path().to_path_buf();
    let (ev_a, ev_b) = (root.join("a.csv"), root.join("b.csv"));
    write_events(&ev_a, 0..n / 2, users);
    write_events(&ev_b, n / 2..n, users);
    let (log_a, log_b) = (root.join("acked-a.txt"), root.join("acked-b.txt"));
    let stop = Arc::new(AtomicBool::new(false));
    let reads = reader(
        vec![c.node("a").url(), c.node("b").url()],
        users,
        stop.clone(),
        Duration::ZERO,
    );
    let mut la = start_loader(c.node("a"), &ev_a, &log_a, 50);
    let mut lb = start_loader(c.node("b"), &ev_b, &log_b, 50);
    c.wait(60, "a quarter of the events acked", || {
        acked_rows(&log_a).len() + acked_rows(&log_b).len() >= n / 4
    });
    let c_had = serving(c.node("c"));
    assert!(!c_had.is_empty(), "node c owned no partition");
    c.node_mut("c").kill9();
    let killed = Instant::now();
    c.wait(60, "c's partitions served by a and b", || {
        all_served_by(&c, &["a", "b"])
    });
    println!(
        "SIGKILL of a node owning {} of {PARTITIONS} partitions (R3, lease {:.0} s, under load): all served by the others after {:.2} s",
        c_had.len(),
        c.tuning.lease_period_ms as f64 / 1000.0,
        killed.elapsed().as_secs_f64()
    );
    let failovers = AtomicU64::new(0);
    for n in ["a", "b"] {
        let v = try_cluster(c.node(n)).unwrap();
        failovers.fetch_add(
            v["counts"]["failovers"].as_u64().unwrap_or(0),
            Ordering::Relaxed,
        );
    }
    assert!(failovers.load(Ordering::Relaxed) >= c_had.len() as u64);
    c.node_mut("c").spawn();
    c.wait(60, "partitions back on c", || balanced(&c));
    for (name, l) in [("a", &mut la), ("b", &mut lb)] {
        let status = l.wait().unwrap();
        assert!(status.success(), "loader through {name} failed: {status:?}");
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, bad, why) = reads.join().unwrap();
    assert!(ok > 0);
    assert_eq!(bad, 0, "failed queries: {:?}", &why[..why.len().min(5)]);
    let acked: Vec<String> = acked_rows(&log_a)
        .into_iter()
        .chain(acked_rows(&log_b))
        .collect();
    assert_eq!(acked.len(), n, "every event acked once by the loaders");
    assert_applied_once(&c, "a", &acked, users);
    // Every node's item statistics (each fed by every partition's stream) counted each
    // acked event once: every item here was named by exactly one event.
    for name in NAMES {
        let node = c.node(name);
        c.wait(60, "every node's item stats saw every item", || {
            items_counted(node) == n as u64
        });
        let mut counts: HashMap<&str, Value> = HashMap::new();
        for i in &acked {
            let r = node.get(&format!("/v1/items/{i}/stats"));
            counts.insert(i, r.body["event_count"].clone());
        }
        let wrong: Vec<(&&str, &Value)> = counts.iter().filter(|(_, v)| **v != 1).take(5).collect();
        assert!(
            wrong.is_empty(),
            "{name}'s item stats count these items' events wrongly: {wrong:?}"
        );
    }
}

/// A node with another cookie cannot join: both sides report the failed handshake, it
/// claims no partition, and the others keep serving all of them.
#[test]
fn cluster_wrong_cookie_is_refused_and_reported() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(mut c) = Cluster::start(&["a", "b"], |_| "right-cookie") else {
        return;
    };
    c.wait(60, "a and b serve every partition", || {
        all_served_by(&c, &["a", "b"])
    });
    let (members, url) = (c.members.clone(), c.nats.urls());
    c.launch("c", "wrong-cookie", &members, &url);
    c.wait(30, "a and b report c's handshake refused", || {
        ["a", "b"].iter().all(|n| {
            let (state, error) = member_state(c.node(n), "c");
            state == "refused" && error.contains("cookie")
        })
    });
    c.wait(30, "c reports a and b refused", || {
        ["a", "b"].iter().all(|n| {
            let (state, error) = member_state(c.node("c"), n);
            state == "refused" && error.contains("cookie")
        })
    });
    let view = try_cluster(c.node("c")).unwrap();
    if view["joined"] != false {
        c.fail(&format!("c joined with a wrong cookie: {view}"));
    }
    assert!(serving(c.node("c")).is_empty());
    assert!(all_served_by(&c, &["a", "b"]));
    assert!(owners(c.node("a")).iter().all(|o| o == "a" || o == "b"));
}

/// SIGSTOP of a node until its leases lapse: its partitions move; after SIGCONT it finds
/// its leases gone, serves nothing from its old ownership, rejoins and gets partitions
/// back.
#[test]
fn cluster_paused_node_loses_its_leases_and_rejoins() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(c) = Cluster::balanced_three() else {
        return;
    };
    assert!(!serving(c.node("c")).is_empty());
    c.node("c").signal("STOP");
    c.wait(60, "c's partitions served by a and b", || {
        all_served_by(&c, &["a", "b"])
    });
    c.node("c").signal("CONT");
    // Its first answer after the pause already shows no partition it no longer owns.
    let mine = serving(c.node("c"));
    let now = owners(c.node("a"));
    for p in &mine {
        assert_eq!(
            now[*p as usize], "c",
            "c serves partition {p} from a lapsed lease"
        );
    }
    c.wait(60, "c serves partitions again", || balanced(&c));
}

/// Long leases, so that a takeover before the lease runs out is told apart from one
/// after it.
fn long_lease() -> Tuning {
    Tuning {
        lease_period_ms: 20_000,
        lease_renew_ms: 2_000,
        ..Tuning::default()
    }
}

/// Whether `peer` is marked exited in `n`'s view.
fn exited_in_view(n: &Node, peer: &str) -> bool {
    try_cluster(n).is_some_and(|c| {
        c["members"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["name"] == peer).cloned())
            .is_some_and(|m| !m["exited_ms_ago"].is_null())
    })
}

/// A hung member (SIGSTOP: its listening sockets still accept) keeps its partitions for
/// its whole lease though its sessions are closed; a SIGKILLed member (its addresses
/// refuse connections) has its partitions taken over and answered fully long before its
/// 20 s lease could run out (ADR 017).
#[test]
fn cluster_exited_member_is_taken_over_before_its_lease_and_a_hung_one_is_not() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(nats) = NatsCluster::one() else {
        return;
    };
    let mut c = Cluster::balanced_on(nats, long_lease());
    let before = owners(c.node("a"));
    c.node("b").signal("STOP");
    c.wait(
        30,
        "a and c closed their sessions with the paused b",
        || {
            ["a", "c"]
                .iter()
                .all(|n| member_state(c.node(n), "b").0 == "down")
        },
    );
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for n in ["a", "c"] {
            assert_eq!(
                owners(c.node(n)),
                before,
                "{n}: a hung member's partitions moved before its lease ran out"
            );
            assert!(
                !exited_in_view(c.node(n), "b"),
                "{n} took the paused b for exited"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    c.node("b").signal("CONT");
    c.wait(60, "b up and serving again", || {
        balanced(&c) && member_state(c.node("a"), "b").0 == "up"
    });
    let c_had = serving(c.node("c"));
    assert!(!c_had.is_empty(), "node c owned no partition");
    let users: Vec<String> = c_had.iter().map(|&p| user_in(p)).collect();
    c.node_mut("c").kill9();
    let killed = Instant::now();
    c.wait(15, "c's partitions served by a and b", || {
        all_served_by(&c, &["a", "b"])
    });
    let served = killed.elapsed();
    c.wait(15, "full answers for c's users through a and b", || {
        ["a", "b"].iter().all(|n| {
            users.iter().all(|u| {
                let r = c.node(n).get(&format!("/v1/recommendations/{u}?k=3"));
                r.status == 200 && r.body["degraded"] == false
            })
        })
    });
    let answered = killed.elapsed();
    println!(
        "SIGKILL of a member owning {} of {PARTITIONS} partitions, lease 20 s: served by the others after {:.2} s, \
         full answers through both after {:.2} s",
        c_had.len(),
        served.as_secs_f64(),
        answered.as_secs_f64()
    );
    assert!(exited_in_view(c.node("a"), "c") && exited_in_view(c.node("b"), "c"));
    let takeovers: u64 = ["a", "b"]
        .iter()
        .map(|n| {
            try_cluster(c.node(n)).unwrap()["counts"]["takeovers"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    assert!(
        takeovers >= c_had.len() as u64,
        "{takeovers} takeovers for {} partitions",
        c_had.len()
    );
    // The restarted c is no longer exited and gets partitions back.
    c.node_mut("c").spawn();
    c.wait(60, "partitions back on c", || balanced(&c));
    assert!(!exited_in_view(c.node("a"), "c"));
}

/// The only member, SIGKILLed and started again: the new process takes back its
/// predecessor's leases once they missed a renewal, not after the whole 20 s lease.
#[test]
fn cluster_restarted_member_takes_back_its_predecessors_leases_early() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(nats) = NatsCluster::one() else {
        return;
    };
    let mut c = Cluster::on_names(nats, long_lease(), &["a"]);
    let (members, url) = (c.members.clone(), c.nats.urls());
    c.launch("a", "test-cookie", &members, &url);
    c.wait(60, "every partition served by a", || {
        all_served_by(&c, &["a"])
    });
    c.node_mut("a").kill9();
    let killed = Instant::now();
    c.node_mut("a").spawn();
    c.wait(15, "every partition served by the restarted a", || {
        all_served_by(&c, &["a"])
    });
    println!(
        "restarted member serving all its partitions again {:.2} s after the SIGKILL (lease 20 s, renew 2 s)",
        killed.elapsed().as_secs_f64()
    );
    let v = try_cluster(c.node("a")).unwrap();
    assert!(v["counts"]["takeovers"].as_u64().unwrap_or(0) >= PARTITIONS as u64);
}

/// A user whose partition is `p`.
fn user_in(p: u64) -> String {
    (0..10_000)
        .map(|i| format!("probe{i}"))
        .find(|u| u64::from(troupe_actors::record::partition_of(u, PARTITIONS)) == p)
        .unwrap()
}

/// Partition -> the nodes serving it now (each node asked once).
fn served_by(c: &Cluster, names: &[&str]) -> HashMap<u64, Vec<String>> {
    let mut m: HashMap<u64, Vec<String>> = HashMap::new();
    for n in names {
        for p in serving(c.node(n)) {
            m.entry(p).or_default().push(n.to_string());
        }
    }
    m
}

/// The link between a and b cut (through a fault-injecting proxy) while both reach the
/// log: ownership stays where it is, a's answers for b's partitions are degraded and
/// flagged; after the link heals they are forwarded again.
#[test]
fn cluster_cut_link_between_two_nodes_keeps_ownership_and_degrades() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(mut c) = Cluster::prepare() else {
        return;
    };
    let proxy = troupe_tests::proxy::Proxy::start(c.cluster_addr("b"));
    let (members, url) = (c.members.clone(), c.nats.urls());
    // a (the dialler of b) reaches b only through the proxy.
    let mut a_view = members.clone();
    a_view.iter_mut().find(|m| m.0 == "b").unwrap().1 = proxy.port;
    c.launch("a", "test-cookie", &a_view, &url);
    c.launch("b", "test-cookie", &members, &url);
    c.launch("c", "test-cookie", &members, &url);
    c.wait(60, "partitions balanced over the three nodes", || {
        balanced(&c)
    });
    let before = owners(c.node("a"));
    let b_part = *serving(c.node("b")).iter().next().unwrap();
    let user = user_in(b_part);
    let r = c.node("a").get(&format!("/v1/recommendations/{user}?k=3"));
    assert_eq!(
        (r.status, r.body["route"].as_str()),
        (200, Some("forwarded"))
    );
    proxy.cut();
    c.wait(30, "a sees b not up", || {
        member_state(c.node("a"), "b").0 != "up"
    });
    // Two lease periods: nothing moves, every partition stays served once.
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        let r = c.node("a").get(&format!("/v1/recommendations/{user}?k=3"));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["route"], "owner_unreachable", "{}", r.body);
        assert_eq!(r.body["degraded"], true);
        if !all_served_by(&c, &NAMES) {
            c.fail("a partition lost its single owner while only a link was cut");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for n in NAMES {
        assert_eq!(owners(c.node(n)), before, "ownership changed in {n}'s view");
    }
    proxy.heal();
    let forwarded = || {
        c.node("a")
            .get(&format!("/v1/recommendations/{user}?k=3"))
            .body["route"]
            == "forwarded"
    };
    c.wait(30, "a's answers for b's users forwarded again", forwarded);
    // The link goes silent: no FIN, no RST, the open session is dead for good. Both
    // sides must notice by liveness, close it, and (after heal) a must dial anew.
    let reconnects = |n: &str, peer: &str| {
        try_cluster(c.node(n)).and_then(|v| {
            v["members"]
                .as_array()?
                .iter()
                .find(|m| m["name"] == peer)?["reconnects"]
                .as_u64()
        })
    };
    let before = reconnects("a", "b").unwrap();
    proxy.silence();
    c.wait(30, "a and b close the dead session", || {
        member_state(c.node("a"), "b").0 == "down" && member_state(c.node("b"), "a").0 == "down"
    });
    let r = c.node("a").get(&format!("/v1/recommendations/{user}?k=3"));
    assert_eq!(
        (r.status, &r.body["route"]),
        (200, &Value::from("owner_unreachable")),
        "{}",
        r.body
    );
    for n in NAMES {
        assert_eq!(
            owners(c.node(n)),
            owners(c.node("a")),
            "ownership differs in {n}'s view"
        );
    }
    proxy.heal();
    c.wait(30, "a dials b anew and forwards again", forwarded);
    assert!(
        reconnects("a", "b").unwrap() > before,
        "a forwards again without a new session"
    );
}

/// One node's link to the log cut: its leases lapse, it stops answering for its
/// partitions, the others take them; at no observed moment do two nodes serve one
/// partition. After the link heals it rejoins and gets partitions back.
#[test]
fn cluster_node_cut_from_the_log_stops_serving_and_its_partitions_move() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(mut c) = Cluster::prepare() else {
        return;
    };
    let nats_port = c.nats.servers[0].port;
    let proxy =
        troupe_tests::proxy::Proxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], nats_port)));
    let (members, url) = (c.members.clone(), c.nats.urls());
    c.launch("a", "test-cookie", &members, &url);
    c.launch("b", "test-cookie", &members, &url);
    c.launch(
        "c",
        "test-cookie",
        &members,
        &format!("nats://{}", proxy.addr()),
    );
    c.wait(60, "partitions balanced over the three nodes", || {
        balanced(&c)
    });
    proxy.cut();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = served_by(&c, &NAMES);
        if let Some((p, who)) = m.iter().find(|(_, w)| w.len() > 1) {
            c.fail(&format!("partition {p} served by {who:?} at once"));
        }
        if serving(c.node("c")).is_empty() && all_served_by(&c, &["a", "b"]) {
            break;
        }
        if Instant::now() > deadline {
            c.fail("c's partitions did not move to a and b");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    proxy.heal();
    c.wait(60, "c serves partitions again", || balanced(&c));
}

/// Rolling restart of all three nodes (SIGTERM, start, wait until balanced) while events
/// stream in and queries run: no request fails once retried on 503, no acked event is
/// lost or applied twice, and each partition moves at most twice (its lease epoch).
#[test]
fn cluster_rolling_restart_loses_nothing_and_moves_each_partition_at_most_twice() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(mut c) = Cluster::balanced_three() else {
        return;
    };
    let epochs = |c: &Cluster| -> Vec<u64> {
        try_cluster(c.node("a"))
            .and_then(|v| {
                v["partitions"].as_array().map(|ps| {
                    ps.iter()
                        .map(|p| p["epoch"].as_u64().unwrap_or(0))
                        .collect()
                })
            })
            .unwrap_or_default()
    };
    let start_epochs = epochs(&c);
    let (n, users) = (3_000usize, 30usize);
    let root = c.root.path().to_path_buf();
    let events = root.join("events.csv");
    write_events(&events, 0..n, users);
    let log = root.join("acked.txt");
    let stop = Arc::new(AtomicBool::new(false));
    let reads = reader(
        NAMES.iter().map(|n| c.node(n).url()).collect(),
        users,
        stop.clone(),
        Duration::from_secs(30),
    );
    // The loader talks to c, which restarts last; it retries refused batches.
    let mut load = start_loader(c.node("c"), &events, &log, 50);
    for name in NAMES {
        let code = c.node_mut(name).terminate();
        assert_eq!(code, Some(0), "{name} did not stop cleanly");
        c.node_mut(name).spawn();
        c.wait(60, "partitions balanced again", || balanced(&c));
    }
    let status = load.wait().unwrap();
    assert!(status.success(), "loader failed: {status:?}");
    stop.store(true, Ordering::Relaxed);
    let (ok, bad, why) = reads.join().unwrap();
    assert!(ok > 0);
    assert_eq!(bad, 0, "failed queries: {:?}", &why[..why.len().min(5)]);
    let acked = acked_rows(&log);
    assert_eq!(acked.len(), n);
    assert_applied_once(&c, "a", &acked, users);
    let end = epochs(&c);
    for (p, (a, b)) in start_epochs.iter().zip(&end).enumerate() {
        assert!(b - a <= 2, "partition {p} moved {} times", b - a);
    }
}

/// Queries through `urls` (in turn) until `stop`. A 503 or a refused connection (a node
/// restarting) is retried on the next node for up to `retry_for` (zero: never); any other
/// 5xx, or a request still failing after that, counts as failed.
fn reader(
    urls: Vec<String>,
    users: usize,
    stop: Arc<AtomicBool>,
    retry_for: Duration,
) -> std::thread::JoinHandle<(u64, u64, Vec<String>)> {
    std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let (mut ok, mut bad, mut why) = (0u64, 0u64, Vec::new());
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let give_up = Instant::now() + retry_for;
            let mut k = i;
            let failure = loop {
                let url = &urls[k % urls.len()];
                let last = match agent
                    .get(format!("{url}/v1/recommendations/u{}?k=5", i % users))
                    .call()
                {
                    Ok(mut r) if r.status().as_u16() < 500 => {
                        drop(r.body_mut().read_to_string());
                        break None;
                    }
                    Ok(mut r) if r.status().as_u16() == 503 => {
                        r.body_mut().read_to_string().unwrap_or_default()
                    }
                    Ok(mut r) => {
                        let s = r.status();
                        break Some(format!(
                            "{s} {}",
                            r.body_mut().read_to_string().unwrap_or_default()
                        ));
                    }
                    Err(e) => e.to_string(),
                };
                if Instant::now() >= give_up {
                    break Some(last);
                }
                k += 1;
                std::thread::sleep(Duration::from_millis(50));
            };
            match failure {
                None => ok += 1,
                Some(w) => {
                    bad += 1;
                    why.push(w);
                }
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        (ok, bad, why)
    })
}

/// Read-your-writes across nodes on three servers with replicas 3: an event acknowledged
/// by one node is in the answer of a read of that user through a third node (without
/// `min_offset`), forwarded to the owner, and the answer is not stale.
#[test]
fn cluster_read_through_any_node_sees_a_write_acked_by_another() {
    let _serial = one_at_a_time();
    let _t = timed();
    // Three servers, everything replicated: the freshness target comes from the stream's
    // leader, never from a replica that may lag.
    let Some(nats) = NatsCluster::start() else {
        return;
    };
    let c = Cluster::balanced_on(nats, r3_tuning());
    let p = *serving(c.node("c")).iter().next().unwrap();
    let user = user_in(p);
    for i in 0..20 {
        let body = format!(r#"[{{"user":"{user}","item":"rw{i}","kind":"view"}}]"#);
        let w = c.node("a").post("/v1/events", &body);
        assert_eq!(w.status, 200, "{}", w.body);
        let r = c.node("b").get(&format!("/v1/users/{user}"));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["stale"], false, "{}", r.body);
        let items: Vec<&str> = r.body["history"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|h| h["item"].as_str())
            .collect();
        assert!(
            items.contains(&format!("rw{i}").as_str()),
            "write {i} not seen: {items:?}"
        );
        let rec = c.node("b").get(&format!("/v1/recommendations/{user}?k=5"));
        assert_eq!(
            (rec.status, rec.body["route"].as_str()),
            (200, Some("forwarded"))
        );
        assert_eq!(rec.body["stale"], false, "{}", rec.body);
        assert!(rec.body["applied_offset"].as_u64() >= w.body["results"][0]["offset"].as_u64());
    }
}

/// A partition whose actor fails on every start (an injected recovery fault on every
/// node) is given up by its owner: released and marked failed, claimed by nobody,
/// shown in `/v1/cluster` and counted in the metrics; the nodes stay up and ready, the
/// other partitions stay served, and the partition's users get degraded answers.
#[test]
fn cluster_crash_looping_partition_is_released_and_marked_failed() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(mut c) = Cluster::prepare() else {
        return;
    };
    c.extra = "[[faults]]\ntarget = \"user_features-0.recover\"\naction = \"error\"\n".into();
    let (members, url) = (c.members.clone(), c.nats.urls());
    for n in NAMES {
        c.launch(n, "test-cookie", &members, &url);
    }
    let failed_everywhere = |c: &Cluster| {
        NAMES.iter().all(|n| {
            try_cluster(c.node(n)).is_some_and(|v| {
                v["partitions"][0]["state"] == "failed"
                    && v["partitions"][0]["failed"]
                        .as_str()
                        .is_some_and(|f| f.contains("injected"))
            })
        })
    };
    c.wait(60, "partition 0 failed in every node's view", || {
        failed_everywhere(&c)
    });
    c.wait(60, "the other partitions served once", || {
        let by = served_by(&c, &NAMES);
        (1..PARTITIONS as u64).all(|p| by.get(&p).is_some_and(|w| w.len() == 1))
            && !by.contains_key(&0)
    });
    let failed: f64 = NAMES
        .iter()
        .map(|n| {
            c.node(n)
                .metrics()
                .lines()
                .filter(|l| {
                    l.starts_with("troupe_cluster_partition_events_total{event=\"failed\"}")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        })
        .sum();
    assert!(failed >= 1.0, "no node counted the failed partition");
    for n in NAMES {
        assert_eq!(c.node(n).get("/readyz").status, 200, "{n} not ready");
    }
    let user = user_in(0);
    let r = c.node("a").get(&format!("/v1/recommendations/{user}?k=3"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["degraded"], true);
    assert!(failed_everywhere(&c));
}

/// Owner and epoch of every partition as `n` sees them.
fn leases(n: &Node) -> Vec<(String, u64)> {
    try_cluster(n)
        .and_then(|v| {
            v["partitions"].as_array().map(|ps| {
                ps.iter()
                    .map(|p| {
                        (
                            p["owner"].as_str().unwrap_or("").to_string(),
                            p["epoch"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// After a server came back: every replica of the log, the state bucket and the blob
/// bucket current again, every partition served, new writes through each node acked and
/// applied, and every lease renewed since (its time left refilled).
fn assert_cluster_whole_again(c: &Cluster, n: usize, users: usize) {
    c.wait(120, "every replica current again", || {
        ["troupe", "KV_troupe_state", "OBJ_troupe_blobs"]
            .iter()
            .all(|s| c.nats.stream_whole(s))
    });
    c.wait(60, "every partition served", || all_served_by(c, &NAMES));
    let mut more = Vec::new();
    for (k, m) in NAMES.iter().enumerate() {
        let row = n + k;
        let body = format!(
            r#"[{{"event_id":"after-{row}","user":"u{}","item":"it{row}","kind":"view"}}]"#,
            row % users
        );
        let r = c.node(m).post("/v1/events", &body);
        assert_eq!(r.status, 200, "{m}: {}", r.body);
        more.push(format!("it{row}"));
    }
    let all: Vec<String> = (0..n).map(|i| format!("it{i}")).chain(more).collect();
    assert_applied_once(c, "c", &all, users);
    // A lease renewed within the last renewal interval has at least the lease period
    // less two intervals left.
    let fresh = c.tuning.lease_period_ms - 2 * c.tuning.lease_renew_ms;
    c.wait(60, "every lease renewed recently", || {
        NAMES.iter().all(|m| {
            try_cluster(c.node(m)).is_some_and(|v| {
                v["partitions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["state"] == "serving")
                    .all(|p| p["lease_left_ms"].as_u64().unwrap_or(0) >= fresh)
            })
        })
    });
}

/// Three nodes on a three-server JetStream cluster (R3 stream and buckets), with the
/// default lease timing (15 s, renewed every 3 s): the server leading the lease bucket's
/// stream is SIGKILLed while events stream in and queries run. The lease outlasts the
/// election: no partition changes owner or epoch, no two nodes ever serve one
/// partition, no query fails, and every acked event is applied exactly once.
#[test]
fn cluster_outlasts_a_jetstream_leader_election_without_moving_partitions() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(nats) = NatsCluster::start() else {
        return;
    };
    let tuning = Tuning {
        jetstream: "replicas = 3\nrequest_timeout_ms = 5000\nconnect_timeout_ms = 60000\n".into(),
        lease_period_ms: 15_000,
        lease_renew_ms: 3_000,
        ..Tuning::default()
    };
    let mut c = Cluster::balanced_on(nats, tuning);
    let before = leases(c.node("a"));
    let (n, users) = (3_000usize, 30usize);
    let events = c.root.path().join("events.csv");
    let acked_log = c.root.path().join("acked.txt");
    write_events(&events, 0..n, users);
    let stop = Arc::new(AtomicBool::new(false));
    let reads = reader(
        NAMES.iter().map(|m| c.node(m).url()).collect(),
        users,
        stop.clone(),
        Duration::from_secs(30),
    );
    let mut loader = start_loader(c.node("a"), &events, &acked_log, 50);
    c.wait(60, "a third of the events acked", || {
        acked_rows(&acked_log).len() >= n / 3
    });
    let mut leader = None;
    c.wait(30, "the lease bucket's stream has a leader", || {
        leader = c.nats.stream_leader("KV_troupe_state");
        leader.is_some()
    });
    let leader = leader.unwrap();
    c.nats.servers[leader].kill9();
    let killed = Instant::now();
    let mut restarted = false;
    // Through the election and one lease period after it: never two servers of a
    // partition, and no lease taken over.
    // The least lease time left seen on a serving partition: the election's margin.
    let mut least_left = u64::MAX;
    while killed.elapsed() < Duration::from_secs(25) || loader.try_wait().unwrap().is_none() {
        let mut by: HashMap<u64, Vec<&str>> = HashMap::new();
        for m in NAMES {
            let Some(v) = try_cluster(c.node(m)) else {
                continue;
            };
            for p in v["partitions"].as_array().into_iter().flatten() {
                if p["state"] == "serving" {
                    by.entry(p["partition"].as_u64().unwrap())
                        .or_default()
                        .push(m);
                    least_left = least_left.min(p["lease_left_ms"].as_u64().unwrap_or(0));
                }
            }
        }
        if let Some((p, who)) = by.iter().find(|(_, who)| who.len() > 1) {
            c.fail(&format!("partition {p} served by {who:?} at once"));
        }
        if killed.elapsed() > Duration::from_secs(180) {
            c.fail("the load did not finish within 180 s of the kill");
        }
        // The killed server comes back on its store while the load goes on.
        if !restarted && acked_rows(&acked_log).len() >= 2 * n / 3 {
            c.nats.servers[leader].spawn();
            restarted = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !restarted {
        c.nats.servers[leader].spawn();
    }
    let status = loader.wait().unwrap();
    assert!(status.success(), "loader failed: {status:?}");
    stop.store(true, Ordering::Relaxed);
    let (ok, bad, why) = reads.join().unwrap();
    assert!(ok > 0);
    assert_eq!(bad, 0, "failed queries: {:?}", &why[..why.len().min(5)]);
    for m in NAMES {
        let now = leases(c.node(m));
        if now != before {
            c.fail(&format!(
                "{m} sees leases moved by the election: before {before:?}, after {now:?}"
            ));
        }
    }
    let acked = acked_rows(&acked_log);
    assert_eq!(acked.len(), n);
    assert_applied_once(&c, "b", &acked, users);
    assert_cluster_whole_again(&c, n, users);
    println!(
        "R3 lease-bucket leader s{leader} SIGKILLed and restarted: no partition moved; least lease \
         time left seen {:.1} s of 12 s; {ok} queries answered",
        least_left as f64 / 1000.0
    );
}

/// Three nats-servers and three nodes started at the same moment, ten times: the nodes'
/// first JetStream requests meet servers that have no meta leader yet ("no responders",
/// or no answer at all). Every start step retries with short first attempts until its
/// deadline, so every node becomes ready and none exits; the slowest time to ready of
/// each round is printed.
#[test]
fn cluster_simultaneous_start_with_its_servers_never_exits() {
    let _serial = one_at_a_time();
    let _t = timed();
    let tuning = Tuning {
        jetstream: "replicas = 3\n".into(),
        ..Tuning::default()
    };
    let mut slowest = Vec::new();
    for round in 0..10 {
        let Some(nats) = NatsCluster::launch() else {
            return;
        };
        let started = Instant::now();
        let mut c = Cluster::on(nats, tuning.clone());
        let (members, url) = (c.members.clone(), c.nats.urls());
        for n in NAMES {
            let dir = c.root.path().join(n);
            let own = *c.members.iter().find(|m| m.0 == n).unwrap();
            let http = own.2;
            let text = config(n, &dir, &members, own, &url, &c.tuning);
            c.nodes.push(Node::launch_config(
                &dir,
                http,
                &text,
                &[("TROUPE_CLUSTER_COOKIE", "test-cookie")],
            ));
        }
        let mut ready = [None; 3];
        while ready.iter().any(Option::is_none) {
            for (i, n) in c.nodes.iter_mut().enumerate() {
                if let Some(s) = n.exited() {
                    let log = n.log(n.starts);
                    let tail: Vec<&str> = log.lines().rev().take(30).collect();
                    panic!(
                        "round {round}: node {} exited ({s}) at start:\n{}",
                        NAMES[i],
                        tail.join("\n")
                    );
                }
                if ready[i].is_none() && n.ready() {
                    ready[i] = Some(started.elapsed());
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                c.fail(&format!("round {round}: not every node ready within 60 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let worst = ready.iter().flatten().max().copied().unwrap_or_default();
        slowest.push(worst.as_secs_f64());
        for (i, n) in c.nodes.iter_mut().enumerate() {
            assert!(n.exited().is_none(), "round {round}: {} exited", NAMES[i]);
        }
    }
    println!(
        "simultaneous start of 3 servers and 3 nodes, slowest node ready after (s): {:?}",
        slowest
            .iter()
            .map(|s| (s * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
}

/// `(child, restarts, generation)` of every child of supervisor `sup` as `n` reports it.
fn children_of(n: &Node, sup: &str) -> Vec<(String, u64, u64)> {
    try_cluster_full(n)
        .and_then(|v| {
            v["supervisors"]
                .as_array()?
                .iter()
                .find(|s| s["name"] == sup)
                .map(|s| {
                    s["children"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|c| {
                            (
                                c["name"].as_str().unwrap_or("").to_string(),
                                c["restarts"].as_u64().unwrap_or(0),
                                c["generation"].as_u64().unwrap_or(0),
                            )
                        })
                        .collect()
                })
        })
        .unwrap_or_default()
}

/// The whole `/v1/cluster` document of `n`, if it answers.
fn try_cluster_full(n: &Node) -> Option<Value> {
    std::panic::catch_unwind(|| n.get("/v1/cluster"))
        .ok()
        .filter(|r| r.status == 200)
        .map(|r| r.body)
}

/// Watches every node's view for `secs`: fails when a partition's owner or epoch differs
/// from `expected` in any view, or two nodes serve one partition at once.
fn assert_leases_hold(c: &Cluster, expected: &[(String, u64)], secs: u64, why: &str) {
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        let mut by: HashMap<u64, Vec<&str>> = HashMap::new();
        for m in NAMES {
            for p in serving(c.node(m)) {
                by.entry(p).or_default().push(m);
            }
            let now = leases(c.node(m));
            if !now.is_empty() && now != expected {
                c.fail(&format!(
                    "{why}: {m} sees the leases moved: before {expected:?}, now {now:?}"
                ));
            }
        }
        if let Some((p, who)) = by.iter().find(|(_, w)| w.len() > 1) {
            c.fail(&format!("{why}: partition {p} served by {who:?} at once"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Renewals run on their own actor: node a's lease manager (claims, hand-overs, reads)
/// stalls for more than twice the lease period, and a keeps every lease it holds: no
/// partition changes owner or epoch in any view, and a serves its partitions all along.
#[test]
fn cluster_renewals_outlast_a_stalled_lease_manager() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(mut c) = Cluster::prepare() else {
        return;
    };
    // About 20 s of rounds pass first (the cluster balances meanwhile).
    c.node_extra.push((
        "a",
        "[[faults]]\ntarget = \"lease_manager\"\naction = \"stall\"\nstall_ms = 7000\nskip = 40\ntimes = 1\n"
            .into(),
    ));
    c.launch_balanced(60);
    let before = leases(c.node("a"));
    let mine = serving(c.node("a"));
    assert!(!mine.is_empty());
    c.wait(60, "a's lease manager stalled", || {
        c.node("a").log(1).contains("injected stall")
    });
    let stalled = Instant::now();
    assert_leases_hold(&c, &before, 8, "while a's lease manager stalls");
    assert_eq!(serving(c.node("a")), mine, "a stopped serving a partition");
    assert!(
        c.node("a").log(1).contains("injected stall")
            && stalled.elapsed() >= Duration::from_secs(8)
    );
}

/// Reads of the lease, member and leader records by `n`'s lease actors from `via`
/// (`watch`: the copy its KV watch keeps; `store`: a request per key).
fn record_reads(n: &Node, via: &str) -> f64 {
    n.metric_sum(
        "troupe_cluster_record_reads_total",
        &[&format!("via=\"{via}\"")],
    )
}

/// The lease rounds read the lease and member records from the copy a KV watch keeps,
/// not with a request per key: on a balanced cluster most of a's reads come from the
/// copy. Node b's watch then stalls for 5 s, longer than the 3 s lease period: b's copy
/// is no longer known current, so its rounds read the store meanwhile, and no lease
/// changes owner or epoch in any view (a stale copy read as current would make every
/// other member look lapsed). After the stall b reads its copy again.
#[test]
fn cluster_lease_rounds_read_a_watched_copy_and_the_store_while_it_stalls() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(mut c) = Cluster::prepare() else {
        return;
    };
    // b's own heartbeat comes back every renewal (0.5 s): the stall starts ~40 s in.
    c.node_extra.push((
        "b",
        "[[faults]]\ntarget = \"record_watch\"\naction = \"stall\"\nstall_ms = 5000\non = \"member.b\"\nskip = 80\ntimes = 1\n"
            .into(),
    ));
    c.launch_balanced(60);
    if c.node("b").log(1).contains("injected stall") {
        c.fail("b's watch stalled before the cluster balanced (raise the fault's skip)");
    }
    let (watch0, store0) = (
        record_reads(c.node("a"), "watch"),
        record_reads(c.node("a"), "store"),
    );
    c.wait(60, "b's watch stalled", || {
        c.node("b").log(1).contains("injected stall")
    });
    let stalled = Instant::now();
    let before = leases(c.node("a"));
    let b_store = record_reads(c.node("b"), "store");
    c.wait(
        10,
        "b's rounds read the store while its copy is stale",
        || record_reads(c.node("b"), "store") >= b_store + 3.0,
    );
    let left = Duration::from_secs(6).saturating_sub(stalled.elapsed());
    assert_leases_hold(&c, &before, left.as_secs().max(1), "while b's watch stalls");
    let b_watch = record_reads(c.node("b"), "watch");
    c.wait(20, "b reads its copy again after the stall", || {
        record_reads(c.node("b"), "watch") >= b_watch + 3.0
    });
    let (watch, store) = (
        record_reads(c.node("a"), "watch") - watch0,
        record_reads(c.node("a"), "store") - store0,
    );
    eprintln!(
        "a: {watch} record reads from the watched copy, {store} from the store; b read the store while stalled, its leases held"
    );
    assert!(
        watch >= 10.0 && store * 2.0 <= watch,
        "a's lease rounds should read the watched copy: {watch} reads from the copy, {store} from the store"
    );
}

/// A state store outage longer than the lease period: every owner stops answering
/// (leases lapse), but keeps its partitions' actors; when the server is back, each lease
/// is re-adopted at its last revision (nobody took it), so no partition changes owner or
/// epoch, none is reloaded or replayed (no partition actor restarted, no scope claimed
/// again), and every partition is answered again within a few renewals.
#[test]
fn cluster_store_outage_longer_than_a_lease_moves_and_reloads_nothing() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(mut c) = Cluster::balanced_three() else {
        return;
    };
    for i in 0..30 {
        let body = format!(r#"[{{"event_id":"o{i}","user":"u{i}","item":"it{i}","kind":"view"}}]"#);
        assert_eq!(c.node("a").post("/v1/events", &body).status, 200);
    }
    c.wait(30, "the events applied", || {
        applied_items(c.node("b"), 30).is_some_and(|m| m.len() >= 30)
    });
    let before = leases(c.node("a"));
    let claims = |n: &Node| -> Vec<(String, u64)> {
        try_cluster_full(n)
            .map(|v| {
                v["state"]["claims"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|x| {
                        (
                            x["scope"].as_str().unwrap_or("").to_string(),
                            x["epoch"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let claims_before: Vec<_> = NAMES.iter().map(|m| claims(c.node(m))).collect();
    c.nats.servers[0].kill9();
    let down = Instant::now();
    c.wait(30, "every node's leases lapsed", || {
        NAMES.iter().all(|m| {
            try_cluster(c.node(m)).is_some_and(|v| {
                v["partitions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .all(|p| p["state"] != "serving")
            })
        })
    });
    // Out for twice the lease period in all.
    while down.elapsed() < Duration::from_millis(2 * c.tuning.lease_period_ms) {
        std::thread::sleep(Duration::from_millis(50));
    }
    c.nats.servers[0].spawn();
    let back = Instant::now();
    c.wait(60, "every partition answered again", || {
        all_served_by(&c, &NAMES)
    });
    let answered = back.elapsed();
    assert_leases_hold(&c, &before, 2, "after the outage");
    for (i, m) in NAMES.iter().enumerate() {
        let n = c.node(m);
        assert_eq!(
            claims(n),
            claims_before[i],
            "{m} claimed a scope again (a reload)"
        );
        for (child, restarts, generation) in children_of(n, "partitions_supervisor") {
            assert_eq!(
                (restarts, generation),
                (0, 1),
                "{m}: {child} was restarted by the outage"
            );
        }
    }
    let readopted: f64 = NAMES
        .iter()
        .map(|m| {
            c.node(m)
                .metric_sum("troupe_cluster_partition_events_total", &["readopted"])
        })
        .sum();
    assert_eq!(readopted as u32, PARTITIONS, "every lease re-adopted once");
    assert_applied_once(
        &c,
        "c",
        &(0..30).map(|i| format!("it{i}")).collect::<Vec<_>>(),
        30,
    );
    println!(
        "store outage of {:.1} s (lease period {:.1} s): every partition answered again {:.2} s after the server returned, none moved or reloaded",
        (back - down).as_secs_f64(),
        c.tuning.lease_period_ms as f64 / 1000.0,
        answered.as_secs_f64()
    );
}

/// Failovers on `names` so far (`/v1/cluster` counts).
fn failovers(c: &Cluster, names: &[&str]) -> u64 {
    names
        .iter()
        .filter_map(|m| try_cluster(c.node(m)))
        .map(|v| v["counts"]["failovers"].as_u64().unwrap_or(0))
        .sum()
}

/// Pauses c (SIGSTOP) until its partitions are served by a and b, resumes it, and
/// returns once a and b have seen it alive again for three renewals.
fn pause_until_failover(c: &Cluster) {
    c.node("c").signal("STOP");
    c.wait(60, "c's partitions served by a and b", || {
        all_served_by(c, &["a", "b"])
    });
    c.node("c").signal("CONT");
    c.wait(30, "c answers again", || try_cluster(c.node("c")).is_some());
    std::thread::sleep(Duration::from_millis(3 * c.tuning.lease_renew_ms));
}

/// A member that stalls now and then: without a hold-down each pause costs a failover of
/// the partitions handed back to it in between; with one, only the first pause does.
/// c is paused three times; the failovers are counted and printed for both settings.
#[test]
fn cluster_flapping_member_is_held_down_and_costs_one_failover() {
    let _serial = one_at_a_time();
    let _t = timed();
    let mut counts = Vec::new();
    for hold_down_ms in [1, 30_000] {
        let Some(nats) = NatsCluster::one() else {
            return;
        };
        let mut c = Cluster::on(
            nats,
            Tuning {
                hold_down_ms,
                ..Tuning::default()
            },
        );
        let (members, url) = (c.members.clone(), c.nats.urls());
        for n in NAMES {
            c.launch(n, "test-cookie", &members, &url);
        }
        c.wait(60, "partitions balanced over the three nodes", || {
            balanced(&c)
        });
        let owned_by_c = serving(c.node("c")).len() as u64;
        for round in 0..3 {
            pause_until_failover(&c);
            if hold_down_ms > 1 {
                // Held down: nothing is handed back to it meanwhile.
                let held = try_cluster(c.node("a")).map(|v| v["held_down"].clone());
                assert!(
                    held.as_ref()
                        .and_then(|h| h.as_array())
                        .is_some_and(|h| h.iter().any(|m| m == "c")),
                    "round {round}: a does not hold c down: {held:?}"
                );
                assert!(
                    serving(c.node("c")).is_empty(),
                    "round {round}: c got partitions back"
                );
            } else {
                c.wait(60, "c gets its partitions back", || balanced(&c));
            }
        }
        let n = failovers(&c, &["a", "b"]);
        if hold_down_ms > 1 {
            assert_eq!(
                n, owned_by_c,
                "one failover per partition c owned, not one per pause"
            );
        } else {
            assert!(n >= 3 * owned_by_c.min(1), "{n}");
        }
        counts.push((hold_down_ms, owned_by_c, n));
    }
    for (h, owned, n) in counts {
        println!(
            "member paused 3 times, hold-down {h} ms: {n} failovers (it owned {owned} partitions)"
        );
    }
}

/// A panic in each actor of the control plane (lease manager, lease renewer, membership,
/// gateway) on node a: each is restarted by the cluster supervisor (counted in
/// `/v1/cluster`), no lease moves, and the cluster serves every partition throughout.
#[test]
fn cluster_control_plane_actors_are_supervised() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(mut c) = Cluster::prepare() else {
        return;
    };
    let fault = |target: &str, skip: u64| {
        format!("[[faults]]\ntarget = \"{target}\"\naction = \"panic\"\nskip = {skip}\ntimes = 1\n")
    };
    c.node_extra.push((
        "a",
        [
            fault("lease_manager", 40),
            fault("lease_renewer", 50),
            fault("membership", 120),
            fault("gateway", 300),
        ]
        .concat(),
    ));
    let (members, url) = (c.members.clone(), c.nats.urls());
    for n in NAMES {
        c.launch(n, "test-cookie", &members, &url);
    }
    c.wait(60, "partitions balanced over the three nodes", || {
        balanced(&c)
    });
    let before = leases(c.node("a"));
    let restarted = |c: &Cluster| -> Vec<String> {
        children_of(c.node("a"), "cluster_supervisor")
            .into_iter()
            .filter(|(_, r, _)| *r > 0)
            .map(|(n, _, _)| n)
            .collect()
    };
    let until = Instant::now() + Duration::from_secs(90);
    loop {
        let mut r = restarted(&c);
        r.sort();
        if r == ["gateway", "lease_manager", "lease_renewer", "membership"] {
            break;
        }
        if Instant::now() > until {
            c.fail(&format!(
                "not every control plane actor panicked and restarted: {r:?}"
            ));
        }
        let by = served_by(&c, &NAMES);
        if let Some((p, w)) = by.iter().find(|(_, w)| w.len() > 1) {
            c.fail(&format!("partition {p} served by {w:?} at once"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    c.wait(30, "balanced again", || balanced(&c));
    assert_eq!(leases(c.node("b")), before, "a lease moved");
    let log = c.node("a").log(1);
    for t in ["lease_manager", "lease_renewer", "membership", "gateway"] {
        assert!(log.contains(&format!("injected panic in {t}")), "{t}");
    }
}

/// Tuning for the link-cut tests: three servers, replicas 3, the test lease timing.
fn r3_tuning() -> Tuning {
    Tuning {
        jetstream: "replicas = 3\nrequest_timeout_ms = 5000\nconnect_timeout_ms = 60000\n".into(),
        lease_period_ms: 6000,
        lease_renew_ms: 1000,
        ..Tuning::default()
    }
}

/// Watches the cluster for `secs`: fails when a partition is served by two nodes at once
/// or a node's `/v1/cluster` or `/readyz` takes more than 2 s; returns the longest time
/// any partition went unserved by every node.
fn longest_unserved(c: &Cluster, secs: u64, what: &str) -> Duration {
    let started = Instant::now();
    let mut since: HashMap<u64, Instant> = HashMap::new();
    let mut worst = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(secs) {
        let m = served_by(c, &NAMES);
        if let Some((p, who)) = m.iter().find(|(_, w)| w.len() > 1) {
            c.fail(&format!("{what}: partition {p} served by {who:?} at once"));
        }
        let now = Instant::now();
        for p in 0..PARTITIONS as u64 {
            if m.get(&p).is_some_and(|w| !w.is_empty()) {
                if let Some(t) = since.remove(&p) {
                    worst = worst.max(now - t);
                }
            } else {
                since.entry(p).or_insert(now);
            }
        }
        for n in NAMES {
            for path in ["/v1/cluster", "/readyz"] {
                let t = Instant::now();
                let r = std::panic::catch_unwind(|| c.node(n).get(path));
                if t.elapsed() > Duration::from_secs(2) || r.is_err() {
                    c.fail(&format!(
                        "{what}: {n}{path} answered after {:.1} s ({})",
                        t.elapsed().as_secs_f64(),
                        if r.is_err() { "no answer" } else { "late" }
                    ));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let now = Instant::now();
    if let Some((p, t)) = since.into_iter().next() {
        c.fail(&format!(
            "{what}: partition {p} still unserved after {:.1} s",
            (now - t).as_secs_f64()
        ));
    }
    worst
}

/// Three servers (replicas 3); node c reaches each server only through a proxy, and all
/// three are cut: c cannot reach the log at all. Its status endpoints keep answering
/// within 2 s and say so (`/readyz` cluster.log_reachable false), no partition is ever
/// served twice, and a and b serve every partition within the lease period plus a few
/// seconds (the time is printed). After the heal c rejoins and gets partitions back.
#[test]
fn cluster_node_cut_from_every_server_moves_its_partitions_in_time() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(nats) = NatsCluster::start() else {
        return;
    };
    let (proxies, proxied) = nats.client_proxies();
    let mut c = Cluster::on(nats, r3_tuning());
    let (members, url) = (c.members.clone(), c.nats.urls());
    c.launch("a", "test-cookie", &members, &url);
    c.launch("b", "test-cookie", &members, &url);
    c.launch("c", "test-cookie", &members, &proxied);
    c.wait(90, "partitions balanced over the three nodes", || {
        balanced(&c)
    });
    assert!(!serving(c.node("c")).is_empty());
    for p in &proxies {
        p.cut();
    }
    let took = longest_unserved(&c, 30, "c cut off from every server");
    assert!(all_served_by(&c, &["a", "b"]));
    let ready = c.node("c").get("/readyz");
    assert_eq!(ready.status, 200, "{}", ready.body);
    c.wait(30, "c says the log is unreachable", || {
        c.node("c").get("/readyz").body["cluster"]["log_reachable"] == false
    });
    let limit = Duration::from_millis(c.tuning.lease_period_ms) + Duration::from_secs(5);
    assert!(took <= limit, "partitions unanswered for {took:?}");
    for p in &proxies {
        p.heal();
    }
    c.wait(90, "c serves partitions again", || balanced(&c));
    println!(
        "node cut from every server (R3, lease {:.0} s): longest a partition went unserved {:.2} s",
        c.tuning.lease_period_ms as f64 / 1000.0,
        took.as_secs_f64()
    );
}

/// Three servers whose routes go through proxies; the server leading the lease bucket is
/// cut off from the other two (its routes cut both ways). The nodes connected to it lose
/// the leaders; they reconnect to another server, no partition is ever served twice,
/// status endpoints answer within 2 s, and every partition is served again within the
/// lease period plus a few seconds (printed). After the heal the cluster is whole.
#[test]
fn cluster_server_cut_from_the_others_keeps_every_partition_served() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(nats) = NatsCluster::start_with_route_proxies() else {
        return;
    };
    let c = Cluster::balanced_on(nats, r3_tuning());
    let mut leader = None;
    c.wait(30, "the lease bucket's stream has a leader", || {
        leader = c.nats.stream_leader("KV_troupe_state");
        leader.is_some()
    });
    let leader = leader.unwrap();
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    for &o in &others {
        c.nats.cut(leader, o);
    }
    let took = longest_unserved(&c, 30, "server cut from the others");
    // Writes go through every node.
    for (k, m) in NAMES.iter().enumerate() {
        let body =
            format!(r#"[{{"event_id":"cut-{k}","user":"u{k}","item":"cut{k}","kind":"view"}}]"#);
        let mut ok = false;
        for _ in 0..40 {
            let r = c.node(m).post("/v1/events", &body);
            if r.status == 200 {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        assert!(ok, "{m} takes no writes with server s{leader} cut off");
    }
    c.nats.heal();
    c.wait(120, "the cluster whole again", || {
        ["troupe", "KV_troupe_state", "OBJ_troupe_blobs"]
            .iter()
            .all(|s| c.nats.stream_whole(s))
    });
    c.wait(60, "every partition served", || all_served_by(&c, &NAMES));
    println!(
        "server s{leader} (lease bucket leader) cut from the other two (R3, lease {:.0} s): longest a partition went unserved {:.2} s",
        c.tuning.lease_period_ms as f64 / 1000.0,
        took.as_secs_f64()
    );
    let limit = Duration::from_millis(c.tuning.lease_period_ms) + Duration::from_secs(5);
    assert!(took <= limit, "a partition went unserved for {took:?}");
}

/// A member added after retention deleted the start of the log: its own node-scoped
/// consumers (item statistics, catalog) have no checkpoint, and replaying from offset 0
/// is impossible. They start from another member's checkpoint instead, so the new node
/// becomes ready and counts what the others count.
#[test]
fn cluster_member_added_after_retention_starts_from_a_peers_checkpoint() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(nats) = NatsCluster::one() else {
        return;
    };
    let mut c = Cluster::on(
        nats,
        Tuning {
            journal: "retention = true\n".into(),
            ..Tuning::default()
        },
    );
    let (all, url) = (c.members.clone(), c.nats.urls());
    let two: Vec<Member> = all.iter().filter(|m| m.0 != "c").cloned().collect();
    c.launch("a", "test-cookie", &two, &url);
    c.launch("b", "test-cookie", &two, &url);
    c.wait(60, "a and b serve every partition", || {
        all_served_by(&c, &["a", "b"])
    });
    let (n, users) = (2_000usize, 40usize);
    let events = c.root.path().join("events.csv");
    let acked_log = c.root.path().join("acked.txt");
    write_events(&events, 0..n, users);
    let status = start_loader(c.node("a"), &events, &acked_log, 200)
        .wait()
        .unwrap();
    assert!(status.success());
    c.wait(
        60,
        "retention deleted records every checkpoint covers",
        || {
            ["a", "b"]
                .iter()
                .map(|m| {
                    c.node(m)
                        .metric_sum("troupe_log_truncated_records_total", &[])
                })
                .sum::<f64>()
                > 0.0
        },
    );
    c.wait(60, "a counted every item", || {
        items_counted(c.node("a")) >= n as u64
    });
    // c joins the configuration now, on an empty disk.
    c.launch("c", "test-cookie", &all, &url);
    c.wait(60, "c counted every item", || {
        items_counted(c.node("c")) >= n as u64
    });
    assert_eq!(items_counted(c.node("c")), items_counted(c.node("a")));
    assert!(
        c.node("c")
            .log(1)
            .contains("starting from another member's"),
        "c replayed from the start instead"
    );
}

/// `POST /v1/admin/retrain` through `n`, asked again while it answers 503 (no leader, or
/// no session to it yet), for up to 30 s.
fn retrain_via(n: &Node) -> troupe_tests::Reply {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = n.post("/v1/admin/retrain", "");
        if r.status != 503 || Instant::now() >= deadline {
            return r;
        }
        assert!(
            r.retry_after.is_some(),
            "503 without Retry-After: {}",
            r.body
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The ALS version `n` serves (0: none or no answer).
fn model_version(n: &Node) -> u64 {
    try_cluster_full(n)
        .and_then(|v| v["als_model_version"].as_u64())
        .unwrap_or(0)
}

/// The trainer leader as `n` sees it, and whether `n` leads.
fn trainer(n: &Node) -> (Option<String>, bool) {
    try_cluster(n)
        .map(|c| {
            let t = &c["trainer"];
            (
                t["leader"].as_str().map(str::to_string),
                t["this_node_leads"] == true,
            )
        })
        .unwrap_or((None, false))
}

/// The member that leads the training, once every node agrees on it.
fn agreed_leader(c: &Cluster, names: &[&str]) -> Option<String> {
    let views: Vec<(Option<String>, bool)> = names.iter().map(|n| trainer(c.node(n))).collect();
    let leader = views[0].0.clone()?;
    let leading: Vec<&str> = names
        .iter()
        .zip(&views)
        .filter(|(_, v)| v.1)
        .map(|(n, _)| *n)
        .collect();
    (views.iter().all(|v| v.0.as_deref() == Some(&leader)) && leading == [leader.as_str()])
        .then_some(leader)
}

/// Events over 60 users and 200 items (each user touches a band of related items), so
/// that ALS has something to learn; every user lives in some partition of every node.
fn write_rated(path: &std::path::Path, rows: usize) {
    write_rated_rows(path, 0..rows);
}

/// Rows `rows` of [`write_rated`]'s sequence.
fn write_rated_rows(path: &std::path::Path, rows: std::ops::Range<usize>) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    writeln!(f, "user,item,kind,timestamp").unwrap();
    for r in rows {
        writeln!(
            f,
            "u{},{},view,{}",
            r % 60,
            rated_item(r),
            1_600_000_000 + r
        )
        .unwrap();
    }
}

/// The item of row `r` of [`write_rated`]'s sequence.
fn rated_item(r: usize) -> String {
    let u = r % 60;
    format!("i{}", (u * 3 + (r * 7919) % 23) % 200)
}

/// Events per item in rows `0..rows` of [`write_rated`]'s sequence.
fn rated_counts(rows: usize) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for r in 0..rows {
        *counts.entry(rated_item(r)).or_insert(0) += 1;
    }
    counts
}

/// `n`'s item statistics actor as `/v1/cluster` shows it.
fn item_stats_state(n: &Node) -> Value {
    try_cluster_full(n)
        .and_then(|v| {
            v["actors"]
                .as_array()?
                .iter()
                .find(|a| a["name"] == "item_stats")
                .map(|a| a["state"].clone())
        })
        .unwrap_or(Value::Null)
}

/// The leader counts item statistics from the log; every other node in `names` follows
/// the chain it publishes.
fn item_stats_roles_ok(c: &Cluster, names: &[&str], leader: &str) -> bool {
    names.iter().all(|n| {
        let s = item_stats_state(c.node(n));
        if *n == leader {
            s["role"] == "counting"
        } else {
            s["role"] == "following" && s["following"] == leader && !s["followed"].is_null()
        }
    })
}

/// `n`'s event count of each item in `want` equals it (`sample`: the first that many).
fn item_counts_are(n: &Node, want: &BTreeMap<String, u64>, sample: usize) -> bool {
    want.iter().take(sample).all(|(item, &count)| {
        n.get(&format!("/v1/items/{item}/stats")).body["event_count"] == count
    })
}

/// Item statistics: the trainer leader counts them from the log, every other member
/// follows its published checkpoints (reading nothing of the log for them), and every
/// member counts each item's events alike. A following member's log follower decodes
/// only its own partitions and the catalog (`skipped`: it has skipped records of the
/// others since the last load).
fn assert_item_stats_followed(
    c: &Cluster,
    names: &[&str],
    leader: &str,
    rows: usize,
    skipped: bool,
) {
    let want = rated_counts(rows);
    c.wait(
        30,
        "the leader counts item statistics, the others follow",
        || item_stats_roles_ok(c, names, leader),
    );
    c.wait(30, "every node's item statistics count the events", || {
        names.iter().all(|n| item_counts_are(c.node(n), &want, 10))
    });
    for n in names {
        assert!(
            item_counts_are(c.node(n), &want, want.len()),
            "{n}'s item statistics differ from the events loaded"
        );
    }
    for n in names.iter().filter(|n| **n != leader) {
        let s = item_stats_state(c.node(n));
        assert!(
            s["follow_loads"].as_u64().unwrap_or(0) >= 1,
            "{n} follows {leader}'s chain: {s}"
        );
    }
    for n in names {
        let f = try_cluster_full(c.node(n)).unwrap()["log"]["follower"].clone();
        assert_eq!(
            f["all_partitions"],
            *n == leader,
            "{n}'s log follower decodes every partition only on the leader: {f}"
        );
        if skipped && *n != leader {
            assert!(
                f["skipped_records"].as_u64().unwrap_or(0) > 0,
                "{n} skipped the records of partitions it does not own: {f}"
            );
        }
    }
}

/// Loads [`write_rated`]'s 3,000 events through a and waits until every node agrees on
/// one trainer leader; returns it.
fn load_rated_and_elect(c: &Cluster) -> String {
    let events = c.root.path().join("rated.csv");
    write_rated(&events, 3000);
    let log = c.root.path().join("acked.txt");
    let status = start_loader(c.node("a"), &events, &log, 200)
        .wait()
        .unwrap();
    assert!(status.success());
    c.wait(30, "one trainer leader agreed by every node", || {
        agreed_leader(c, &NAMES).is_some()
    });
    agreed_leader(c, &NAMES).unwrap()
}

/// One model for the cluster: the leader trains on every partition's users (not only
/// those it owns), publishes version 1, and all three nodes serve it; a retrain asked of
/// a node that does not lead reaches the leader. SIGKILL of the leader: another member
/// leads after the lease and publishes the next version (never the same number twice),
/// which the survivors and the restarted node serve. A rollback asked of a node that
/// does not lead reaches every node.
#[test]
fn cluster_serves_one_model_trained_on_every_partition() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(mut c) = Cluster::prepare() else {
        return;
    };
    c.launch_all_balanced();
    // Item texts: each is encoded by one member (its encoder owner); the others read
    // the shared cache.
    let texts: Vec<Value> = (0..300)
        .map(|i| serde_json::json!({"id": format!("i{i}"), "text": format!("item {i} of shelf {}", i % 17)}))
        .collect();
    assert_eq!(
        c.node("a")
            .post("/v1/items", &Value::Array(texts).to_string())
            .status,
        200
    );
    c.wait(60, "every node embedded the 300 texts", || {
        NAMES.iter().all(|n| {
            try_cluster_full(c.node(n)).is_some_and(|v| {
                v["actors"].as_array().is_some_and(|a| {
                    a.iter().any(|x| {
                        x["name"] == "content_encoder" && x["state"]["embedded_items"] == 300
                    })
                })
            })
        })
    });
    let computed: f64 = NAMES
        .iter()
        .map(|n| {
            c.node(n)
                .metric_sum("troupe_embeddings_computed_total", &[])
        })
        .sum();
    println!("300 item texts encoded {computed} times over three nodes");
    assert!(
        computed <= 330.0,
        "texts encoded {computed} times for 300 (each should be encoded once)"
    );
    let leader = load_rated_and_elect(&c);
    assert_item_stats_followed(&c, &NAMES, &leader, 3000, false);
    let other = *NAMES.iter().find(|n| **n != leader).unwrap();
    let r = c.node(other).post("/v1/admin/retrain", "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["accepted"], true, "{}", r.body);
    assert_eq!(r.body["leader"], leader.as_str(), "{}", r.body);
    assert_eq!(
        r.body["users"], 60,
        "trained on every partition's users: {}",
        r.body
    );
    let v1 = r.body["serving_version"].as_u64().unwrap();
    assert_eq!(v1, 1, "{}", r.body);
    c.wait(30, "every node serves version 1", || {
        NAMES.iter().all(|n| model_version(c.node(n)) == v1)
    });
    // Every node's answer for one user uses the same version.
    for n in NAMES {
        let rec = c.node(n).get("/v1/recommendations/u7?k=5");
        assert_eq!(rec.status, 200, "{}", rec.body);
        assert_eq!(rec.body["model_versions"]["als"], v1, "{n}: {}", rec.body);
    }

    // The leader dies: another member leads after the lease and publishes version 2.
    c.node_mut(&leader).kill9();
    let rest: Vec<&str> = NAMES.iter().copied().filter(|n| *n != leader).collect();
    let killed = Instant::now();
    c.wait(60, "a new leader agreed by the survivors", || {
        agreed_leader(&c, &rest).is_some_and(|l| l != leader)
    });
    println!(
        "trainer leader SIGKILLed: a new leader after {:.2} s (lease {} ms)",
        killed.elapsed().as_secs_f64(),
        c.tuning.lease_period_ms
    );
    let new_leader = agreed_leader(&c, &rest).unwrap();
    let asked = *rest.iter().find(|n| **n != new_leader).unwrap();
    let r = retrain_via(c.node(asked));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["leader"], new_leader.as_str(), "{}", r.body);
    assert_eq!(r.body["users"], 60, "{}", r.body);
    let v2 = r.body["serving_version"].as_u64().unwrap();
    assert_eq!(
        v2,
        v1 + 1,
        "the next version, never one issued before: {}",
        r.body
    );
    c.wait(30, "the survivors serve version 2", || {
        rest.iter().all(|n| model_version(c.node(n)) == v2)
    });
    // The new leader counts item statistics on from the positions it followed, each
    // event once: 600 more events through the other survivor.
    let more = c.root.path().join("rated-more.csv");
    write_rated_rows(&more, 3000..3600);
    let status = start_loader(
        c.node(asked),
        &more,
        &c.root.path().join("acked-more.txt"),
        200,
    )
    .wait()
    .unwrap();
    assert!(status.success());
    assert_item_stats_followed(&c, &rest, &new_leader, 3600, true);
    println!(
        "leader failover to the next version served everywhere: {:.2} s after the kill",
        killed.elapsed().as_secs_f64()
    );
    // The restarted node serves the newest version.
    c.node_mut(&leader).spawn();
    c.wait(60, "the restarted node serves version 2", || {
        model_version(c.node(&leader)) == v2
    });
    assert_item_stats_followed(&c, &NAMES, &new_leader, 3600, false);

    // Rollback through a node that does not lead: every node goes back to version 1.
    let r = c.node(asked).post("/v1/admin/rollback", "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["serving_version"], v1, "{}", r.body);
    c.wait(30, "every node serves the rolled-back version", || {
        NAMES.iter().all(|n| model_version(c.node(n)) == v1)
    });
    // Members' records show every node's version in each node's view.
    c.wait(30, "every view lists version 1 for every member", || {
        NAMES.iter().all(|n| {
            try_cluster(c.node(n)).is_some_and(|v| {
                v["members"]
                    .as_array()
                    .is_some_and(|ms| ms.iter().all(|m| m["model_version"] == v1))
            })
        })
    });
}

/// The trainer's status in `n`'s `/v1/cluster` (its actor's observation).
fn trainer_status(n: &Node) -> Value {
    try_cluster_full(n)
        .and_then(|v| {
            v["actors"]
                .as_array()?
                .iter()
                .find(|a| a["name"] == "als_trainer")
                .map(|a| a["state"].clone())
        })
        .unwrap_or(Value::Null)
}

/// A node whose read of a published snapshot is damaged (test hook, once) refuses it by
/// its hash, keeps serving what it had, says so in `/v1/cluster` and a metric, and loads
/// the version on a later try. A leader paused past its lease (SIGSTOP) loses the lead;
/// resumed (SIGCONT), it does not lead, forwards a retrain to the new leader, and every
/// version number is issued once.
#[test]
fn cluster_damaged_snapshot_is_refused_and_a_paused_leader_is_replaced() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(nats) = NatsCluster::one() else {
        return;
    };
    let tuning = Tuning {
        no_trainer: vec!["c"],
        ..Tuning::default()
    };
    let mut c = Cluster::on(nats, tuning);
    c.node_extra.push((
        "c",
        "[[faults]]\ntarget = \"model_blob.corrupt\"\naction = \"error\"\ntimes = 1\n".into(),
    ));
    c.launch_all_balanced();
    let leader = load_rated_and_elect(&c);
    assert_ne!(leader, "c", "c may not lead (trainer = false)");
    let r = c.node("c").post("/v1/admin/retrain", "");
    assert_eq!(r.status, 200, "{}", r.body);
    let v1 = r.body["serving_version"].as_u64().unwrap();
    c.wait(30, "a and b serve the new version", || {
        ["a", "b"].iter().all(|n| model_version(c.node(n)) == v1)
    });
    c.wait(30, "c refused the damaged copy and says so", || {
        trainer_status(c.node("c"))["load_error"]
            .as_str()
            .is_some_and(|e| e.contains("damaged"))
    });
    assert_eq!(model_version(c.node("c")), 0, "c served a damaged snapshot");
    assert!(
        c.node("c")
            .metric_sum("troupe_als_model_load_failures_total", &[])
            >= 1.0
    );
    c.wait(40, "c loads the version on a later try", || {
        model_version(c.node("c")) == v1
    });

    // The leader pauses past its lease: the other eligible member leads and publishes.
    let other = if leader == "a" { "b" } else { "a" };
    c.node(&leader).signal("STOP");
    c.wait(30, "the other eligible member leads", || {
        trainer(c.node(other)).1
    });
    let r = retrain_via(c.node("c"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["leader"], other, "{}", r.body);
    let v2 = r.body["serving_version"].as_u64().unwrap();
    assert_eq!(v2, v1 + 1, "{}", r.body);
    c.node(&leader).signal("CONT");
    c.wait(
        30,
        "the resumed node does not lead and serves the new version",
        || !trainer(c.node(&leader)).1 && model_version(c.node(&leader)) == v2,
    );
    // A retrain asked of it reaches the leader once its session to it is back (503 with
    // Retry-After meanwhile): the next number, never one issued before.
    let r = retrain_via(c.node(&leader));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["leader"], other, "{}", r.body);
    assert_eq!(
        r.body["serving_version"].as_u64().unwrap(),
        v2 + 1,
        "{}",
        r.body
    );
    c.wait(30, "every node serves the newest version", || {
        NAMES.iter().all(|n| model_version(c.node(n)) == v2 + 1)
    });
}

/// The trainer leader SIGKILLed while it trains (a training run stalled by a test hook):
/// the retrain forwarded to it fails with 503, another member leads after the lease,
/// starts its training set from the owners' checkpoints and the log, and publishes
/// version 1 (the killed leader never published, so no number is skipped or reused);
/// a node SIGKILLed and restarted while that training runs ends up serving it, as does
/// the old leader once restarted.
#[test]
fn cluster_leader_killed_while_training_is_replaced_and_every_node_converges() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(mut c) = Cluster::prepare() else {
        return;
    };
    c.extra =
        "[[faults]]\ntarget = \"als_training\"\naction = \"stall\"\nstall_ms = 6000\ntimes = 1\n"
            .into();
    c.launch_all_balanced();
    let leader = load_rated_and_elect(&c);
    let asked = *NAMES.iter().find(|n| **n != leader).unwrap();
    let url_asked = c.node(asked).url();
    let first = std::thread::spawn(move || {
        ureq::post(format!("{url_asked}/v1/admin/retrain"))
            .config()
            .http_status_as_error(false)
            .build()
            .send_empty()
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    });
    c.wait(30, "the leader is training", || {
        trainer_status(c.node(&leader))["training"] == true
    });
    c.node_mut(&leader).kill9();
    let status = first.join().unwrap();
    assert_eq!(
        status, 503,
        "a retrain whose leader died is not answered as done"
    );
    let rest: Vec<&str> = NAMES.iter().copied().filter(|n| *n != leader).collect();
    c.wait(60, "a new leader agreed by the survivors", || {
        agreed_leader(&c, &rest).is_some_and(|l| l != leader)
    });
    let new_leader = agreed_leader(&c, &rest).unwrap();
    let other = *rest.iter().find(|n| **n != new_leader).unwrap();
    let url_other = c.node(other).url();
    let second = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = ureq::post(format!("{url_other}/v1/admin/retrain"))
                .config()
                .http_status_as_error(false)
                .build()
                .send_empty();
            match r {
                Ok(mut r) if r.status() != 503 || Instant::now() >= deadline => {
                    let body = r.body_mut().read_to_string().unwrap_or_default();
                    return (r.status().as_u16(), body);
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    });
    c.wait(30, "the new leader is training", || {
        trainer_status(c.node(&new_leader))["training"] == true
    });
    // The node that asked is killed and restarted while the training runs.
    c.node_mut(other).kill9();
    c.node_mut(other).spawn();
    let (status, body) = second.join().unwrap();
    // The asking node died mid-request: ask again through the new leader itself.
    let report: Value = if status == 200 {
        serde_json::from_str(&body).unwrap()
    } else {
        let r = retrain_via(c.node(&new_leader));
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
    };
    assert_eq!(report["leader"], new_leader.as_str(), "{report}");
    assert_eq!(report["users"], 60, "{report}");
    let v = report["serving_version"].as_u64().unwrap();
    assert!(v == 1 || v == 2, "{report}");
    c.node_mut(&leader).spawn();
    c.wait(60, "every node serves the newest version", || {
        NAMES.iter().all(|n| model_version(c.node(n)) == v)
    });
    // Every version number issued once, from 1 on.
    let versions: Vec<u64> = trainer_status(c.node(&new_leader))["record"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x["version"].as_u64())
        .collect();
    assert_eq!(versions, (1..=v).collect::<Vec<_>>());
    assert!(
        c.node(&new_leader)
            .log(1)
            .contains("from its owner's checkpoint"),
        "the new leader built its training set from the owners' checkpoints"
    );
}

/// The spans of trace `trace_id` received so far.
fn trace_spans(rx: &troupe_tests::OtlpReceiver, trace_id: &str) -> Vec<Value> {
    rx.spans()
        .into_iter()
        .filter(|s| s["trace_id"] == trace_id)
        .collect()
}

/// The span named `name` recorded by node `instance` in `spans`.
fn span_of<'a>(spans: &'a [Value], name: &str, instance: &str) -> Option<&'a Value> {
    spans
        .iter()
        .find(|s| s["name"] == name && s["instance"] == instance)
}

/// A recommendation asked of node a for a user whose partition b owns is one trace: the
/// caller's `traceparent` is the parent of a's `http` span, a's forwarding `call` span is
/// its child, b's `gateway` span is the child of that call (across the processes), and
/// b's `rank` span the child of the gateway; every span names its node in the resource.
#[test]
fn cluster_forwarded_request_is_one_trace_across_both_nodes() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(mut c) = Cluster::prepare() else {
        return;
    };
    let rx = troupe_tests::OtlpReceiver::start(c.root.path());
    c.extra = format!(
        "[telemetry]\notlp_endpoint = \"{}\"\notlp_protocol = \"http/json\"\nsample_ratio = 1.0\n",
        rx.url()
    );
    c.launch_all_balanced();
    let p = *serving(c.node("b")).iter().next().unwrap();
    let user = user_in(p);
    // The write goes through a inside a caller's trace; b owns the partition.
    let (write_trace, writer) = ("5cf92f3577b34da6a3ce929d0e0e4737", "10f067aa0ba902b8");
    let w = c.node("a").post_with(
        "/v1/events",
        &format!(r#"[{{"user":"{user}","item":"t1","kind":"view"}}]"#),
        &[("traceparent", &format!("00-{write_trace}-{writer}-01"))],
    );
    assert_eq!(w.status, 200, "{}", w.body);
    let (trace_id, caller) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let rec = c.node("a").get_with(
        &format!("/v1/recommendations/{user}?k=5"),
        &[("traceparent", &format!("00-{trace_id}-{caller}-01"))],
    );
    assert_eq!(rec.status, 200, "{}", rec.body);
    assert_eq!(rec.body["route"], "forwarded", "{}", rec.body);
    assert_eq!(rec.body["served_by"], "b", "{}", rec.body);
    // The batch exporters send within seconds.
    let mut spans = Vec::new();
    c.wait(60, "the spans of both nodes received", || {
        spans = trace_spans(&rx, trace_id);
        span_of(&spans, "rank", "b").is_some() && span_of(&spans, "http", "a").is_some()
    });
    let http = span_of(&spans, "http", "a").unwrap();
    let call = span_of(&spans, "call", "a").expect("a's forwarding span");
    let gateway = span_of(&spans, "gateway", "b").expect("b's gateway span");
    let rank = span_of(&spans, "rank", "b").unwrap();
    assert_eq!(http["parent"], caller, "{http}");
    assert_eq!(call["parent"], http["span_id"], "{call}");
    assert_eq!(gateway["parent"], call["span_id"], "{gateway}");
    assert_eq!(rank["parent"], gateway["span_id"], "{rank}");
    for s in [http, call, gateway, rank] {
        assert_eq!(s["service"], "troupe", "{s}");
    }
    assert_eq!(gateway["attributes"]["request"], "recommend", "{gateway}");
    // No span of this trace came from c, which had nothing to do with it.
    assert!(spans.iter().all(|s| s["instance"] != "c"), "{spans:?}");
    // The write's event, published on a with its trace context in the message headers,
    // is applied on b, the partition's owner, in a span whose parent is a's request
    // span: the write and its apply are one trace across the two processes.
    let mut written = Vec::new();
    c.wait(60, "the apply of the traced write exported by b", || {
        written = trace_spans(&rx, write_trace);
        written.iter().any(|s| {
            s["name"] == "apply"
                && s["instance"] == "b"
                && s["attributes"]["consumer"] == "user_features"
        })
    });
    let request = span_of(&written, "http", "a").expect("a's write span");
    assert_eq!(request["parent"], writer, "{request}");
    let apply = written
        .iter()
        .find(|s| {
            s["name"] == "apply"
                && s["instance"] == "b"
                && s["attributes"]["consumer"] == "user_features"
        })
        .unwrap();
    assert_eq!(apply["parent"], request["span_id"], "{apply}");
    assert_eq!(
        troupe_tests::as_int(&apply["attributes"]["stream"]),
        Some(p as i64),
        "{apply}"
    );
}

/// A client program (`troupe-client`) joined to the cluster: it sees only the members'
/// gateways; its writes are acknowledged with positions and read back through another
/// member (read-your-writes with `min_offset`); invalid input is refused with the reason
/// HTTP gives; when the member it talks to is SIGKILLed mid-run it fails over to another
/// member, and every write it was acknowledged is in the cluster afterwards, once.
#[test]
fn cluster_client_fails_over_and_loses_no_acknowledged_write() {
    use troupe_client::proto::api::{EventIn, ItemIn, RecommendQuery};
    use troupe_client::{Client, ClientConfig, ClientError};
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(mut c) = Cluster::balanced_three() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seeds: Vec<String> = NAMES
        .iter()
        .map(|n| c.cluster_addr(n).to_string())
        .collect();
    let mut cfg = ClientConfig::new(
        &seeds.iter().map(String::as_str).collect::<Vec<_>>(),
        "test-cookie",
    );
    cfg.name = "failover-test".into();
    cfg.call_timeout = Duration::from_secs(20);
    let client = rt
        .block_on(Client::connect_with(cfg))
        .expect("client connects");
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        while troupe_client::members_seen().len() < 3 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    assert_eq!(troupe_client::members_seen(), vec!["a", "b", "c"]);
    // Access: the only remote actors this client sees are the members' gateways.
    for g in ractor::pg::which_groups() {
        assert!(g.starts_with("troupe.gateway."), "client sees group {g}");
    }
    for name in ractor::registry::registered() {
        assert!(
            !["ranker", "journal", "item_stats", "als_trainer", "catalog"].contains(&name.as_str()),
            "client sees node actor {name}"
        );
    }
    // A client that joins a process group named after a member intercepts nothing:
    // members look a peer's gateway up among that peer's own sessions.
    let rogue_calls = Arc::new(AtomicU64::new(0));
    let rogue = rt
        .block_on(ractor::Actor::spawn(None, Rogue, rogue_calls.clone()))
        .unwrap()
        .0;
    ractor::pg::join("troupe.gateway.b".into(), vec![rogue.get_cell()]);
    let p = *serving(c.node("b")).iter().next().unwrap();
    let user = user_in(p);
    // The join travels over the client's sessions at once; every answer meanwhile and
    // after must still come from b.
    for _ in 0..50 {
        let r = c.node("a").get(&format!("/v1/recommendations/{user}?k=3"));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            (r.body["route"].as_str(), r.body["served_by"].as_str()),
            (Some("forwarded"), Some("b")),
            "{}",
            r.body
        );
    }
    assert_eq!(
        rogue_calls.load(Ordering::Relaxed),
        0,
        "a called the rogue gateway"
    );
    rogue.stop(None);
    // Cluster status through the client: the owners HTTP shows.
    let status = rt.block_on(client.cluster_status()).unwrap();
    assert_eq!(status.members.len(), 3, "{status:?}");
    assert_eq!(status.partitions.len(), PARTITIONS as usize);
    let asked = c.node(&status.node).get("/v1/cluster");
    for (p, q) in status
        .partitions
        .iter()
        .zip(asked.body["cluster"]["partitions"].as_array().unwrap())
    {
        assert_eq!(p.owner, q["owner"].as_str().unwrap(), "{status:?}");
    }
    // Invalid input: the reason HTTP gives for the same event.
    let bad = EventIn {
        user: String::new(),
        item: "i".into(),
        kind: "view".into(),
        ..Default::default()
    };
    let err = rt.block_on(client.ingest(vec![bad], None)).unwrap_err();
    let http = c
        .node("a")
        .post("/v1/events", r#"[{"user":"","item":"i","kind":"view"}]"#);
    assert_eq!(http.status, 400);
    match &err {
        ClientError::Invalid { code, detail } => {
            assert_eq!(code, http.body["error"].as_str().unwrap());
            assert_eq!(detail, http.body["detail"].as_str().unwrap());
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    // Items, then events with their own ids, each read back through the client.
    let items: Vec<ItemIn> = (0..20)
        .map(|i| ItemIn {
            id: format!("ci{i}"),
            text: format!(
                "item number {i} about {}",
                ["trains", "boats", "planes"][i % 3]
            ),
            categories: vec![["rail", "sea", "air"][i % 3].into()],
            ..Default::default()
        })
        .collect();
    let w = rt.block_on(client.upsert_items(items)).unwrap();
    assert_eq!(w.acked, 20);
    let mut acked: Vec<(String, String)> = Vec::new();
    let mut write = |round: usize| -> Result<(), ClientError> {
        let events: Vec<EventIn> = (0..6)
            .map(|u| EventIn {
                event_id: Some(format!("ce-{round}-{u}")),
                user: format!("cu{u}"),
                item: format!("ci{}", (round + u) % 20),
                kind: "view".into(),
                ..Default::default()
            })
            .collect();
        let w = rt.block_on(client.ingest(events.clone(), None))?;
        assert_eq!(w.positions.len(), 6);
        for e in events {
            acked.push((e.user, e.item));
        }
        // Read-your-writes through whichever member answers.
        let p = w.positions[0];
        let u = rt.block_on(client.get_user("cu0", Some(p.offset)))?;
        assert!(!u.stale, "{u:?}");
        assert!(u
            .view
            .history
            .iter()
            .any(|t| t.item == format!("ci{}", round % 20)));
        Ok(())
    };
    for round in 0..5 {
        write(round).unwrap();
    }
    let r = rt
        .block_on(client.recommend(RecommendQuery {
            user: "cu1".into(),
            k: 5,
            ..Default::default()
        }))
        .unwrap();
    assert!(!r.items.is_empty(), "{r:?}");
    assert_eq!(
        r.items[0].shares.len(),
        troupe_client::proto::api::Branch::ALL.len()
    );
    let sim = rt.block_on(client.similar("ci0", 3, Some(w.positions[0].offset)));
    assert!(sim.is_ok(), "{sim:?}");
    // Kill the member the client talks to, mid-run.
    let victim = rt.block_on(client.current_member()).unwrap();
    let idx = NAMES.iter().position(|n| *n == victim).unwrap();
    c.nodes[idx].kill9();
    for round in 5..15 {
        // A write may meet the partition moving (unavailable): retried, as callers are
        // told to; the event ids make the retry safe.
        let mut tries = 0;
        loop {
            match write(round) {
                Ok(()) => break,
                Err(ClientError::Unavailable { .. }) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("round {round}: {e}"),
            }
        }
    }
    let now_on = rt.block_on(client.current_member()).unwrap();
    assert_ne!(now_on, victim, "the client failed over");
    // Everything acknowledged is there, once, seen through a survivor.
    let survivor = NAMES.iter().find(|n| **n != victim).unwrap();
    let mut want: HashMap<String, usize> = HashMap::new();
    for (u, _) in &acked {
        *want.entry(u.clone()).or_default() += 1;
    }
    c.wait(60, "every acknowledged event applied", || {
        want.iter().all(|(u, n)| {
            let r = c.node(survivor).get(&format!("/v1/users/{u}"));
            r.status == 200 && r.body["events"].as_u64() == Some(*n as u64)
        })
    });
}

/// The client example (`crates/client/examples/quickstart.rs`) against real members, the
/// member it talks to SIGKILLed mid-run: it finishes every round through another member,
/// and every event it was acknowledged is in the cluster once.
#[test]
fn cluster_client_example_runs_through_a_member_killed_mid_run() {
    let _serial = one_at_a_time();
    let _t = timed();
    let exe = troupe_tests::troupe_bin()
        .parent()
        .unwrap()
        .join("examples")
        .join("quickstart");
    if !exe.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = std::process::Command::new(cargo)
            .args(["build", "-p", "troupe-client", "--example", "quickstart"])
            .status()
            .unwrap();
        assert!(ok.success(), "building the example");
    }
    let Some(mut c) = Cluster::balanced_three() else {
        return;
    };
    let seeds: Vec<String> = NAMES
        .iter()
        .map(|n| c.cluster_addr(n).to_string())
        .collect();
    let rounds = 30;
    let out = c.root.path().join("quickstart.out");
    let mut child = std::process::Command::new(&exe)
        .env("TROUPE_SEEDS", seeds.join(","))
        .env("TROUPE_CLUSTER_COOKIE", "test-cookie")
        .env("TROUPE_ROUNDS", rounds.to_string())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let text = || std::fs::read_to_string(&out).unwrap_or_default();
    c.wait(60, "the example's third round", || {
        text().contains("round 2:")
    });
    let victim = text()
        .lines()
        .rev()
        .find_map(|l| l.split(" via ").nth(1))
        .unwrap()
        .trim()
        .to_string();
    let idx = NAMES.iter().position(|n| *n == victim).unwrap();
    c.nodes[idx].kill9();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the example did not finish: {}",
            text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let t = text();
    assert!(status.success(), "{t}");
    assert!(t.contains(&format!("round {}:", rounds - 1)), "{t}");
    let after: Vec<&str> = t
        .lines()
        .skip_while(|l| !l.contains(&format!("via {victim}")))
        .filter_map(|l| l.split(" via ").nth(1))
        .collect();
    assert!(
        after.iter().any(|m| m.trim() != victim),
        "never answered by another member: {t}"
    );
    assert!(t.contains("recommendations (served by"), "{t}");
    let survivor = NAMES.iter().find(|n| **n != victim).unwrap();
    c.wait(
        60,
        "every acknowledged event of the example applied",
        || {
            let r = c.node(survivor).get("/v1/users/qs-user");
            r.status == 200 && r.body["events"].as_u64() == Some(3 * rounds as u64)
        },
    );
}

/// A client-side actor posing as member b's gateway (counts what reaches it).
struct Rogue;

impl ractor::Actor for Rogue {
    type Msg = troupe_client::GatewayMsg;
    type State = Arc<AtomicU64>;
    type Arguments = Arc<AtomicU64>;

    async fn pre_start(
        &self,
        _me: ractor::ActorRef<Self::Msg>,
        calls: Arc<AtomicU64>,
    ) -> Result<Arc<AtomicU64>, ractor::ActorProcessingErr> {
        Ok(calls)
    }

    async fn handle(
        &self,
        _me: ractor::ActorRef<Self::Msg>,
        msg: Self::Msg,
        calls: &mut Arc<AtomicU64>,
    ) -> Result<(), ractor::ActorProcessingErr> {
        let troupe_client::GatewayMsg::Call(_, port) = msg;
        calls.fetch_add(1, Ordering::Relaxed);
        drop(port.send(Vec::new()));
        Ok(())
    }
}

/// A cluster with a bearer token: a client without it is refused writes and user data
/// with `Unauthorized` (HTTP's 401), still reads recommendations (public reads); the same
/// client with the token writes and reads the user back.
#[test]
fn cluster_client_calls_need_the_token_where_http_does() {
    use troupe_client::proto::api::{EventIn, RecommendQuery};
    use troupe_client::{Client, ClientConfig, ClientError};
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(nats) = NatsCluster::one() else {
        return;
    };
    let mut c = Cluster::on(
        nats,
        Tuning {
            http: "auth_token = \"s3cret\"\n".into(),
            ..Tuning::default()
        },
    );
    c.launch_all_balanced();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seeds: Vec<String> = NAMES
        .iter()
        .map(|n| c.cluster_addr(n).to_string())
        .collect();
    let mut cfg = ClientConfig::new(
        &seeds.iter().map(String::as_str).collect::<Vec<_>>(),
        "test-cookie",
    );
    cfg.name = "token-test".into();
    let client = rt
        .block_on(Client::connect_with(cfg))
        .expect("client connects");
    let event = || {
        vec![EventIn {
            event_id: Some("tok-1".into()),
            user: "tu".into(),
            item: "ti".into(),
            kind: "view".into(),
            ..Default::default()
        }]
    };
    let http = c
        .node("a")
        .post("/v1/events", r#"[{"user":"tu","item":"ti","kind":"view"}]"#);
    assert_eq!(http.status, 401, "{}", http.body);
    match rt.block_on(client.ingest(event(), None)) {
        Err(ClientError::Unauthorized(why)) => {
            assert_eq!(why, http.body["detail"].as_str().unwrap())
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    assert!(matches!(
        rt.block_on(client.get_user("tu", None)),
        Err(ClientError::Unauthorized(_))
    ));
    // Recommendations are public reads.
    let r = rt.block_on(client.recommend(RecommendQuery {
        user: "tu".into(),
        k: 3,
        ..Default::default()
    }));
    assert!(r.is_ok(), "{r:?}");
    let client = client.with_token("s3cret");
    let w = rt.block_on(client.ingest(event(), None)).unwrap();
    assert_eq!(w.acked, 1);
    let u = rt
        .block_on(client.get_user("tu", Some(w.positions[0].offset)))
        .unwrap();
    assert_eq!(u.view.events, 1);
    assert!(matches!(
        rt.block_on(client.clone().with_token("wrong").erase_user("tu")),
        Err(ClientError::Unauthorized(_))
    ));
}

/// A rolling upgrade across protocol versions: a runs as the oldest build this one
/// still talks to would (`[cluster] protocol = 4`: it writes and accepts only 4), b and c
/// speak the newest. Every member sees every other up (none incompatible); recommendations and
/// user reads are forwarded both ways (old to new, new to old) with read-your-writes; a
/// client speaking the newest version works through a in the older version and gets an
/// explicit version error (never a timeout) for an operation the older version lacks.
/// Then a is upgraded in place (restarted without the pin): the operation works through
/// it and the peers talk to it in the newest version again.
#[test]
fn cluster_rolling_upgrade_nodes_of_older_and_newer_protocol_versions_work_together() {
    use troupe_client::proto::api::Op;
    use troupe_client::proto::wire;
    use troupe_client::{Client, ClientConfig, ClientError};
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(mut c) = Cluster::prepare() else {
        return;
    };
    let (old, new) = (wire::OLDEST, wire::PROTOCOL);
    // The operation the old version lacks.
    let needs = Op::DeadLetters.since();
    assert!(needs > old);
    // Appended to the [cluster] section, which closes the node's file.
    c.node_extra.push(("a", format!("protocol = {old}\n")));
    c.launch_all_balanced();
    let member = |view: &Value, name: &str| -> Value {
        view["members"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["name"] == name))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let all_up = |c: &Cluster| {
        NAMES.iter().all(|n| {
            try_cluster(c.node(n)).is_some_and(|v| {
                NAMES
                    .iter()
                    .filter(|m| *m != n)
                    .all(|m| member(&v, m)["state"] == "up")
            })
        })
    };
    c.wait(30, "every member up in every member's view", || all_up(&c));
    let view = |c: &Cluster, n: &str| try_cluster(c.node(n)).expect("cluster view");
    assert_eq!(member(&view(&c, "a"), "a")["protocol"], old);
    assert_eq!(member(&view(&c, "b"), "b")["protocol"], new);
    assert_eq!(
        member(&view(&c, "b"), "a")["protocol"],
        old,
        "b talks to a in {old}"
    );
    // Forwarded both ways, each read after a write acknowledged by another node.
    for (via, owner) in [("a", "b"), ("b", "a"), ("c", "a"), ("a", "c")] {
        let p = *serving(c.node(owner)).iter().next().unwrap();
        let user = user_in(p);
        let item = format!("up-{via}-{owner}");
        let w = c.node(owner).post(
            "/v1/events",
            &format!(r#"[{{"user":"{user}","item":"{item}","kind":"view"}}]"#),
        );
        assert_eq!(w.status, 200, "{}", w.body);
        let r = c.node(via).get(&format!("/v1/users/{user}"));
        assert_eq!(r.status, 200, "{via} -> {owner}: {}", r.body);
        assert_eq!(r.body["stale"], false, "{}", r.body);
        assert!(
            r.body.to_string().contains(&item),
            "{via} -> {owner}: {}",
            r.body
        );
        let rec = c.node(via).get(&format!("/v1/recommendations/{user}?k=5"));
        assert_eq!(rec.status, 200, "{via} -> {owner}: {}", rec.body);
        assert_eq!(
            rec.body["route"], "forwarded",
            "{via} -> {owner}: {}",
            rec.body
        );
        assert_eq!(rec.body["served_by"], owner, "{}", rec.body);
        assert_eq!(
            rec.body["degraded"], false,
            "{via} -> {owner}: {}",
            rec.body
        );
        // An answer that crossed the old version lacks the branch it does not know.
        let branches: Vec<&str> = rec.body["branches"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|b| b["name"].as_str())
            .collect();
        let crossed_old = via == "a" || owner == "a";
        assert_eq!(
            branches.contains(&"item_item"),
            !crossed_old,
            "{via} -> {owner}: {}",
            rec.body
        );
    }
    // A client of the newest version, joined through a only.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let connect = |seed: &str, name: &str| {
        let mut cfg = ClientConfig::new(&[seed], "test-cookie");
        cfg.name = name.into();
        cfg.call_timeout = Duration::from_secs(20);
        rt.block_on(Client::connect_with(cfg))
            .expect("client connects")
    };
    let a_addr = c.cluster_addr("a").to_string();
    let client = connect(&a_addr, "upgrade-test");
    let status = rt
        .block_on(client.cluster_status())
        .expect("status through a");
    assert!(status.members.iter().any(|m| m.name == "a"));
    let asked = Instant::now();
    let refused = rt.block_on(client.dead_letters());
    match &refused {
        Err(ClientError::Version(why)) => {
            assert!(why.contains(&format!("needs protocol {needs}")), "{why}")
        }
        other => panic!("dead letters through a node of {old}: {other:?}"),
    }
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "refused only after {:?}",
        asked.elapsed()
    );
    drop(client);
    // a is upgraded in place: same data, no pin.
    let a = c.node_mut("a");
    assert_eq!(a.terminate(), Some(0));
    let text = std::fs::read_to_string(&a.config).unwrap();
    std::fs::write(&a.config, text.replace(&format!("protocol = {old}\n"), "")).unwrap();
    a.spawn();
    c.wait(60, "every member up again", || all_up(&c));
    c.wait(
        30,
        "b talks to the upgraded a in the newest version",
        || member(&view(&c, "b"), "a")["protocol"] == new,
    );
    assert_eq!(member(&view(&c, "a"), "a")["protocol"], new);
    let client = connect(&a_addr, "upgrade-test-2");
    let dead = rt
        .block_on(client.dead_letters())
        .expect("dead letters through the upgraded a");
    assert!(dead.is_empty(), "{dead:?}");
    c.wait(60, "every partition served", || all_served_by(&c, &NAMES));
}

/// Client calls count against the member's admission limits together with HTTP
/// requests: with one read slot (`max_in_flight = 1`) held by a client recommendation
/// that stalls in the ranker, another client read is refused `Overloaded` with a retry
/// delay at once (not queued, not timed out), and so is an HTTP read to the same member
/// (503 with Retry-After); once the slow call is answered, reads are admitted again.
#[test]
fn cluster_client_calls_obey_the_members_admission_limits() {
    use troupe_client::proto::api::RecommendQuery;
    use troupe_client::{Client, ClientConfig, ClientError};
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(nats) = NatsCluster::one() else {
        return;
    };
    let mut c = Cluster::on(
        nats,
        Tuning {
            http: "max_in_flight = 1\n".into(),
            ..Tuning::default()
        },
    );
    c.extra = "[[faults]]\ntarget = \"ranker\"\naction = \"stall\"\nstall_ms = 4000\non = \"slow-user\"\ntimes = 1\n".into();
    c.launch_all_balanced();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cfg = ClientConfig::new(&[c.cluster_addr("a").to_string().as_str()], "test-cookie");
    cfg.name = "admission-test".into();
    cfg.call_timeout = Duration::from_secs(20);
    let client = rt
        .block_on(Client::connect_with(cfg))
        .expect("client connects");
    let query = |user: &str| RecommendQuery {
        user: user.into(),
        k: 5,
        ..Default::default()
    };
    // The slow user has a history, so the ranker (where the fault waits) answers it.
    let w = c.node("b").post(
        "/v1/events",
        r#"[{"user":"slow-user","item":"s1","kind":"view"},{"user":"u1","item":"s1","kind":"view"}]"#,
    );
    assert_eq!(w.status, 200, "{}", w.body);
    rt.block_on(client.recommend(query("warm-up")))
        .expect("a read with the slot free");
    let member = rt
        .block_on(client.current_member())
        .expect("a member answered");
    let slow = {
        let client = client.clone();
        let q = query("slow-user");
        rt.spawn(async move { client.recommend(q).await })
    };
    c.wait(3, "the slow call holding the member's read slot", || {
        c.node(&member)
            .metric_sum("troupe_http_in_flight", &["class=\"read\""])
            >= 1.0
    });
    // The slow call holds the member's one read slot: the next read is refused at once.
    let mut refused = None;
    c.wait(3, "a client read refused while the slot is held", || {
        let asked = Instant::now();
        match rt.block_on(client.recommend(query("u1"))) {
            Err(ClientError::Overloaded {
                detail,
                retry_after,
            }) => {
                refused = Some((detail, retry_after, asked.elapsed()));
                true
            }
            _ => false,
        }
    });
    let (detail, retry_after, took) = refused.unwrap();
    assert!(detail.contains("reads"), "{detail}");
    assert!(retry_after > Duration::ZERO);
    assert!(took < Duration::from_secs(1), "refused after {took:?}");
    // HTTP shares the limit.
    let r = c.node(&member).get("/v1/recommendations/u1?k=5");
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.retry_after.is_some(), "{}", r.body);
    // The slow call itself is answered, and the slot is free again.
    rt.block_on(slow)
        .unwrap()
        .expect("the slow call is answered");
    rt.block_on(client.recommend(query("u1")))
        .expect("a read once the slot is free");
    assert_eq!(
        c.node(&member).get("/v1/recommendations/u1?k=5").status,
        200
    );
}

/// The item ids of an answer's `items` list, in order.
fn answer_items(body: &Value) -> Vec<String> {
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["item"].as_str().unwrap().to_string())
        .collect()
}

/// The rows of the page's table `tbody` as (key attribute, cell texts).
fn page_rows(
    b: &troupe_tests::browser::Browser,
    tbody: &str,
    key: &str,
) -> Vec<(String, Vec<String>)> {
    let v = b.eval(
        "return [...document.querySelectorAll('#' + arguments[0] + ' tr')].map(r => \
         [r.getAttribute(arguments[1]) || '', [...r.children].map(c => c.textContent)]);",
        vec![Value::from(tbody), Value::from(key)],
    );
    serde_json::from_value(v).unwrap_or_default()
}

/// The status page in a real browser (headless Chromium over WebDriver) against a live
/// 3-node cluster with data and a model: members, partitions with their owners, the
/// model version and its validation NDCG, the recommendation form (the rendered list is
/// the API's answer, with share bars and flags), similar items; a SIGKILLed member turns
/// down on the page. A screenshot is saved in the test's temp dir (and copied to
/// `TROUPE_SCREENSHOT_DIR` when set).
#[test]
fn cluster_status_page_in_a_browser_shows_the_cluster_and_answers_the_form() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some(mut c) = Cluster::prepare() else {
        return;
    };
    let Some(browser) = troupe_tests::browser::Browser::start(c.root.path()) else {
        return;
    };
    c.launch_all_balanced();
    let texts: Vec<Value> = (0..200)
        .map(|i| serde_json::json!({"id": format!("i{i}"), "text": format!("item {i} of shelf {}", i % 17), "categories": [format!("c{}", i % 5)]}))
        .collect();
    let r = c
        .node("a")
        .post("/v1/items", &Value::Array(texts).to_string());
    assert_eq!(r.status, 200, "{}", r.body);
    load_rated_and_elect(&c);
    let r = retrain_via(c.node("b"));
    assert_eq!(r.status, 200, "{}", r.body);
    let v1 = r.body["serving_version"].as_u64().unwrap();
    c.wait(30, "every node serves the model", || {
        NAMES.iter().all(|n| model_version(c.node(n)) == v1)
    });

    let a = c.node("a");
    browser.goto(&format!("{}/", a.url()));
    browser.wait(20, "three members up on the page", |b| {
        let rows = page_rows(b, "members", "data-member");
        rows.len() == 3 && rows.iter().all(|(_, cells)| cells[1] == "up")
    });
    // Every member shows the version it serves.
    browser.wait(20, "each member's model version on the page", |b| {
        page_rows(b, "members", "data-member")
            .iter()
            .all(|(_, cells)| cells[2] == v1.to_string())
    });
    // Partitions: one row each, the owner the API names.
    let api = try_cluster(a).unwrap();
    let owners: HashMap<String, String> = api["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["partition"].to_string(),
                p["owner"].as_str().unwrap_or("none").to_string(),
            )
        })
        .collect();
    browser.wait(10, "the partition map with the API's owners", |b| {
        let rows = page_rows(b, "partitions", "data-partition");
        rows.len() == PARTITIONS as usize
            && rows
                .iter()
                .all(|(p, cells)| owners.get(p) == Some(&cells[1]))
    });
    // The model: the serving version with its validation NDCG, drawn as a chart point.
    let versions = page_rows(&browser, "versions", "data-version");
    assert!(
        versions
            .iter()
            .any(|(v, cells)| *v == v1.to_string() && cells[0].contains("serving")),
        "{versions:?}"
    );
    let points = browser.eval(
        "return document.querySelectorAll('#ndcg-chart circle').length;",
        vec![],
    );
    assert!(points.as_u64().unwrap_or(0) >= 1, "no NDCG point drawn");
    // The supervision tree and the breakers.
    let actors = page_rows(&browser, "actors", "data-actor");
    assert!(actors.iter().any(|(n, _)| n == "ranker"), "{actors:?}");
    let breakers = page_rows(&browser, "breakers", "data-breaker");
    assert!(
        breakers
            .iter()
            .any(|(n, cells)| n == "als" && cells[1] == "closed"),
        "{breakers:?}"
    );

    // The form: user -> top-k, the rendered list is the API's answer.
    browser.type_into("#user-id", "u7");
    browser.type_into("#user-k", "5");
    browser.click("#user-submit");
    browser.wait(15, "the form's answer rendered", |b| {
        b.eval(
            "return document.getElementById('user-form').dataset.done || '0';",
            vec![],
        ) == "1"
    });
    let shown: Vec<String> = page_rows(&browser, "recs", "data-item")
        .into_iter()
        .map(|(item, _)| item)
        .collect();
    let api = a.get("/v1/recommendations/u7?k=5&explain=true");
    assert_eq!(api.status, 200, "{}", api.body);
    let expected = answer_items(&api.body);
    assert_eq!(expected.len(), 5, "{}", api.body);
    assert_eq!(shown, expected, "the page shows the API's list");
    let bars = browser.eval(
        "return document.querySelectorAll('#recs [data-branch]').length;",
        vec![],
    );
    assert!(bars.as_u64().unwrap_or(0) >= 5, "share bars drawn: {bars}");
    for flag in ["degraded", "stale", "cold_start"] {
        let v = browser.eval(
            "return document.querySelector('[data-flag=\"' + arguments[0] + '\"]').dataset.value;",
            vec![Value::from(flag)],
        );
        assert_eq!(v, api.body[flag].as_bool().unwrap().to_string(), "{flag}");
    }
    let route = browser.eval(
        "return document.querySelector('[data-flag=\"route\"]').dataset.value;",
        vec![],
    );
    assert!(
        ["local", "forwarded"].contains(&route.as_str().unwrap_or("")),
        "{route}"
    );

    // Similar items for an item id.
    browser.type_into("#similar-id", "i3");
    browser.click("#similar-submit");
    let api = a.get("/v1/items/i3/similar?k=10");
    assert_eq!(api.status, 200, "{}", api.body);
    let expected = answer_items(&api.body);
    assert!(!expected.is_empty(), "{}", api.body);
    browser.wait(15, "the similar items rendered", |b| {
        page_rows(b, "similar", "data-item")
            .into_iter()
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
            == expected
    });
    let shot = c.root.path().join("status-page.png");
    browser.screenshot(&shot);
    println!("screenshot: {}", shot.display());
    if let Ok(dir) = std::env::var("TROUPE_SCREENSHOT_DIR") {
        std::fs::copy(&shot, std::path::Path::new(&dir).join("status-page.png")).unwrap();
    }

    // A member killed: the page (refreshing itself) shows it down.
    c.node_mut("c").kill9();
    browser.wait(30, "member c shown down on the page", |b| {
        page_rows(b, "members", "data-member")
            .iter()
            .any(|(n, cells)| n == "c" && cells[1] != "up")
    });
}

/// A Prometheus server (Debian's `prometheus`) on the shipped configuration, copied
/// unchanged into `dir` beside a targets file naming the live nodes. Killed on drop.
struct Prometheus {
    child: std::process::Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl Prometheus {
    fn query(&self, q: &str) -> Value {
        let r = ureq::get(format!("{}/api/v1/query", self.url))
            .query("query", q)
            .call();
        match r {
            Ok(mut r) => serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap(),
            Err(e) => serde_json::json!({"status": "error", "error": e.to_string()}),
        }
    }

    fn api(&self, path: &str) -> Value {
        let mut r = ureq::get(format!("{}{path}", self.url)).call().unwrap();
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
    }
}

/// `prometheus` and `promtool` from `TROUPE_PROMETHEUS_DIR` or Debian's `/usr/bin`; `None`
/// with a message when absent, unless `TROUPE_REQUIRE_PROMETHEUS=1`.
fn prometheus_tools() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let dir = std::env::var("TROUPE_PROMETHEUS_DIR").unwrap_or_else(|_| "/usr/bin".into());
    let dir = std::path::Path::new(&dir);
    let (server, tool) = (dir.join("prometheus"), dir.join("promtool"));
    if server.exists() && tool.exists() {
        return Some((server, tool));
    }
    let msg = "prometheus and promtool not installed (apt-get install prometheus)";
    if std::env::var("TROUPE_REQUIRE_PROMETHEUS").as_deref() == Ok("1") {
        panic!("{msg}, and TROUPE_REQUIRE_PROMETHEUS=1");
    }
    eprintln!("skipping: {msg}");
    None
}

/// A rule's expression `<quantity> <op> <threshold>` with the comparison made to keep
/// every series (`op bool`), so that it returns data whether or not the alert holds.
fn quantity_of(rule: &str) -> String {
    let ops = [" == ", " != ", " >= ", " <= ", " > ", " < "];
    let (at, op) = ops
        .iter()
        .filter_map(|op| rule.rfind(op).map(|i| (i, *op)))
        .max_by_key(|(i, _)| *i)
        .unwrap_or_else(|| panic!("rule without a comparison: {rule}"));
    format!(
        "{} {} bool {}",
        &rule[..at],
        op.trim(),
        &rule[at + op.len()..]
    )
}

/// The shipped Prometheus configuration, alert rules and Grafana board against a live
/// 3-node cluster: `promtool check config` and `check rules` pass; after scrapes, every
/// query of the board (its variables substituted) and the quantity of every alert rule
/// return data through Prometheus's HTTP API; after a SIGKILL, the node-down and failover
/// alerts fire.
#[test]
fn cluster_prometheus_rules_and_board_work_against_a_live_cluster() {
    let _serial = one_at_a_time();
    let _t = timed();
    let Some((server, promtool)) = prometheus_tools() else {
        return;
    };
    let Some(mut c) = Cluster::prepare() else {
        return;
    };
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let prom_dir = c.root.path().join("prometheus");
    std::fs::create_dir_all(prom_dir.join("targets")).unwrap();
    for f in ["prometheus.yml", "alerts.yml"] {
        std::fs::copy(deploy.join(f), prom_dir.join(f)).unwrap();
    }
    let targets: Vec<String> = c
        .members
        .iter()
        .map(|(_, _, http)| format!("127.0.0.1:{http}"))
        .collect();
    std::fs::write(
        prom_dir.join("targets/troupe.json"),
        serde_json::json!([{"targets": targets}]).to_string(),
    )
    .unwrap();
    for args in [
        vec!["check", "config", "prometheus.yml"],
        vec!["check", "rules", "alerts.yml"],
    ] {
        let out = std::process::Command::new(&promtool)
            .args(&args)
            .current_dir(&prom_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // A cluster with data, a model, answers and writes, so every series exists.
    c.launch_all_balanced();
    load_rated_and_elect(&c);
    let r = retrain_via(c.node("a"));
    assert_eq!(r.status, 200, "{}", r.body);
    c.wait(30, "every node serves the model", || {
        NAMES.iter().all(|n| model_version(c.node(n)) >= 1)
    });
    let port = free_port();
    let log = std::fs::File::create(prom_dir.join("prometheus.log")).unwrap();
    let prom = Prometheus {
        child: std::process::Command::new(&server)
            .arg("--config.file=prometheus.yml")
            .arg(format!(
                "--storage.tsdb.path={}",
                prom_dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(&prom_dir)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
        url: format!("http://127.0.0.1:{port}"),
    };
    let traffic = |c: &Cluster| {
        for (i, n) in NAMES.iter().enumerate() {
            let node = c.node(n);
            node.get(&format!("/v1/recommendations/u{i}?k=5"));
            node.post(
                "/v1/events",
                &format!(r#"[{{"user":"u{i}","item":"i{}","kind":"view"}}]"#, i + 1),
            );
        }
    };
    // Scraped at least three times (rates need two samples in their window).
    c.wait(60, "three nodes scraped three times", || {
        traffic(&c);
        let v = prom.query("count_over_time(up{job=\"troupe\"}[1m]) >= 3");
        v["data"]["result"].as_array().is_some_and(|r| r.len() == 3)
    });

    // Every query of the board returns data (Grafana's variables substituted).
    let board: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy.join("grafana/troupe.json")).unwrap())
            .unwrap();
    let mut queries: Vec<String> = Vec::new();
    for p in board["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            queries.push(
                t["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", "30s")
                    .replace("$instance", ".*"),
            );
        }
    }
    assert!(queries.len() >= 20, "{queries:?}");
    // The quantity of every alert rule, as Prometheus loaded them.
    let rules = prom.api("/api/v1/rules");
    let mut alerts = Vec::new();
    for g in rules["data"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            alerts.push(r["name"].as_str().unwrap().to_string());
            queries.push(quantity_of(r["query"].as_str().unwrap()));
        }
    }
    for a in [
        "TroupeNodeDown",
        "TroupePartitionUnowned",
        "TroupePartitionFailed",
        "TroupeApplyLagHigh",
        "TroupeDeadLettersGrowing",
        "TroupeBreakerOpen",
        "TroupeLogNotWritable",
        "TroupeTrainerLeaderMissing",
        "TroupeModelVersionsDiffer",
        "TroupeHttp5xxRate",
        "TroupeAdmissionSaturated",
        "TroupeFailover",
    ] {
        assert!(
            alerts.iter().any(|x| x == a),
            "rule {a} missing: {alerts:?}"
        );
    }
    let mut empty: Vec<String> = queries.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !empty.is_empty() && Instant::now() < deadline {
        traffic(&c);
        empty.retain(|q| {
            let v = prom.query(q);
            assert_ne!(v["status"], "error", "{q}: {v}");
            v["data"]["result"].as_array().is_none_or(|r| r.is_empty())
        });
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        empty.is_empty(),
        "queries without data after 60 s: {empty:#?}"
    );
    println!(
        "{} board and rule queries answered with data",
        queries.len()
    );

    // A node killed: the node-down and failover alerts fire.
    let dead = format!(
        "127.0.0.1:{}",
        c.members.iter().find(|m| m.0 == "c").unwrap().2
    );
    c.node_mut("c").kill9();
    let firing = |name: &str, instance: Option<&str>| {
        prom.api("/api/v1/alerts")["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| {
                a["labels"]["alertname"] == name
                    && a["state"] == "firing"
                    && instance.is_none_or(|i| a["labels"]["instance"] == i)
            })
    };
    c.wait(90, "TroupeNodeDown firing for the killed node", || {
        firing("TroupeNodeDown", Some(&dead))
    });
    c.wait(60, "TroupeFailover firing", || {
        firing("TroupeFailover", None)
    });
}

/// Partition -> its one server among `names` (empty when some partition is not served
/// exactly once).
fn owner_map(c: &Cluster, names: &[&str]) -> HashMap<u64, String> {
    let by = served_by(c, names);
    if (0..PARTITIONS as u64).any(|p| by.get(&p).is_none_or(|v| v.len() != 1)) {
        return HashMap::new();
    }
    by.into_iter().map(|(p, v)| (p, v[0].clone())).collect()
}

/// The owner map over `names` once it is the same twice, a rebalance interval apart.
fn settled_owners(c: &Cluster, names: &[&str]) -> HashMap<u64, String> {
    let mut last = HashMap::new();
    c.wait(30, &format!("ownership settled over {names:?}"), || {
        let now = owner_map(c, names);
        let same = !now.is_empty() && now == last;
        last = now;
        std::thread::sleep(Duration::from_millis(500));
        same
    });
    last
}

/// A fourth member joins a running 3-node cluster under write load and leaves again,
/// with no file of the three edited: a, b and c list only each other; d lists a alone
/// (its seed) and describes itself by `advertise`. The three discover d from its member
/// record and dial it; it appears in every member list, `up`. Joining moves only the
/// partitions whose rendezvous owner is now the new member (every partition that changes
/// hands goes to it); leaving (SIGTERM) hands back only those, and d leaves every member
/// list; every acknowledged event is applied exactly once.
#[test]
fn cluster_fourth_member_joins_and_leaves_with_incremental_rebalancing_and_loses_nothing() {
    let _serial = one_at_a_time();
    let _t = timed();
    const FOUR: [&str; 4] = ["a", "b", "c", "d"];
    let Some(nats) = NatsCluster::one() else {
        return;
    };
    let mut c = Cluster::on_names(nats, Tuning::default(), &FOUR);
    let (members, url) = (c.members.clone(), c.nats.urls());
    let three: Vec<Member> = members.iter().filter(|m| m.0 != "d").copied().collect();
    let seed: Vec<Member> = members.iter().filter(|m| m.0 == "a").copied().collect();
    for n in NAMES {
        c.launch(n, "test-cookie", &three, &url);
    }
    c.wait(60, "a, b and c serve every partition, each some", || {
        all_served_by(&c, &NAMES) && NAMES.iter().all(|n| !serving(c.node(n)).is_empty())
    });
    let before = settled_owners(&c, &NAMES);

    let (n, users) = (3_000usize, 30usize);
    let events = c.root.path().join("events.csv");
    write_events(&events, 0..n, users);
    let log = c.root.path().join("acked.txt");
    let mut load = start_loader(c.node("a"), &events, &log, 50);
    c.wait(60, "a quarter of the events acked", || {
        acked_rows(&log).len() >= n / 4
    });

    for n in NAMES {
        assert_eq!(
            member_state(c.node(n), "d").0,
            "",
            "{n} knows d before it started"
        );
    }
    // d joins with a as its only seed: the others discover it, it takes partitions,
    // and only partitions move to it.
    c.launch("d", "test-cookie", &seed, &url);
    c.wait(60, "d serves partitions and each is served once", || {
        all_served_by(&c, &FOUR) && !serving(c.node("d")).is_empty()
    });
    let d_http = format!("127.0.0.1:{}", members[3].2);
    c.wait(
        30,
        "every member lists every other up, with d's address",
        || {
            FOUR.iter().all(|n| {
                FOUR.iter()
                    .filter(|o| *o != n)
                    .all(|o| member_state(c.node(n), o).0 == "up")
            }) && NAMES.iter().all(|n| {
                try_cluster(c.node(n)).is_some_and(|v| {
                    v["members"].as_array().is_some_and(|ms| {
                        ms.iter()
                            .any(|m| m["name"] == "d" && m["http_addr"] == d_http.as_str())
                    })
                })
            })
        },
    );
    let during = settled_owners(&c, &FOUR);
    let moved: Vec<u64> = (0..PARTITIONS as u64)
        .filter(|p| during[p] != before[p])
        .collect();
    for p in &moved {
        assert_eq!(
            during[p], "d",
            "partition {p} moved between old members on join: {before:?} -> {during:?}"
        );
    }
    assert!(
        !moved.is_empty() && moved.len() < PARTITIONS as usize,
        "join moved {moved:?}"
    );
    println!(
        "join: {} of {PARTITIONS} partitions moved, all to the new member",
        moved.len()
    );

    // d leaves gracefully: only its partitions move, to the remaining members.
    assert_eq!(
        c.node_mut("d").terminate(),
        Some(0),
        "d did not stop cleanly"
    );
    c.wait(60, "a, b and c serve every partition again", || {
        all_served_by(&c, &NAMES)
    });
    c.wait(30, "d left every member list", || {
        NAMES
            .iter()
            .all(|n| try_cluster(c.node(n)).is_some() && member_state(c.node(n), "d").0.is_empty())
    });
    let after = owner_map(&c, &NAMES);
    for p in 0..PARTITIONS as u64 {
        if during[&p] != "d" {
            assert_eq!(
                after[&p], during[&p],
                "partition {p} moved on leave though d did not own it"
            );
        }
    }
    let status = load.wait().unwrap();
    assert!(status.success(), "loader failed: {status:?}");
    let acked = acked_rows(&log);
    assert_eq!(acked.len(), n);
    assert_applied_once(&c, "a", &acked, users);
}
