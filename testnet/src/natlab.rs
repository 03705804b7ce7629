//! A NAT lab: home routers and an "internet" made of Linux network namespaces.
//!
//! [`Lab::new`] creates one namespace acting as the internet's router. [`Lab::add_public`]
//! adds a host with a public address on it; [`Lab::add_home`] adds a home: a router
//! namespace (its WAN side on the internet, NAT by iptables) and a host namespace behind it
//! on a private LAN. Every link is a veth pair created directly between two of the lab's own
//! namespaces, so nothing ever appears in, or is changed in, the host's own namespace.
//!
//! Addresses: link `k` of the internet is `198.18.k.0/24` (the benchmarking range, never a
//! private one, so a node classifies it as public), the internet router is `.1` and the
//! public host or home router `.2`. Homes use `192.168.<h>.0/24`, router `.1`, host `.2`.
//! The internet has no route to any home LAN.
//!
//! NAT kinds ([`Nat`]): `Cone` masquerades and keeps the source port where it can, so one
//! socket has one public mapping whatever it talks to (endpoint-independent mapping); both
//! drop unsolicited inbound packets (no port forward; NEW connections from the WAN are
//! dropped, not refused, as home routers do). `Symmetric` gives every new flow a fresh random
//! port (`--random-fully`), so the port a relay saw is useless to anyone else: hole punching
//! cannot work through it.
//!
//! Talking to a process inside: [`Lab::command`] runs a program in a host's namespace, and
//! [`Lab::runtime`] gives a tokio runtime whose thread has entered the namespace (setns), so
//! futures spawned on it open their sockets there (a node's API on its own 127.0.0.1).
//!
//! Cleanup: dropping the lab kills every process left in its namespaces and deletes them,
//! also when a test panics; a lab whose process died without dropping (SIGKILL) is removed by
//! the next [`Lab::new`], found by the pid in its namespace names.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every namespace a lab creates: `kl<pid>x<n>-<role>`.
const PREFIX: &str = "kl";

/// Why the lab could not be built or changed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A tool the lab needs is missing or namespaces cannot be made here.
    #[error("the NAT lab cannot run here: {0}")]
    Unavailable(String),
    /// A command failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Entering a namespace failed.
    #[error("cannot enter namespace {ns}: {source}")]
    Setns {
        /// The namespace.
        ns: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// How a home router translates addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// Masquerade keeping ports: one mapping per socket (hole punching can work).
    Cone,
    /// A random port per flow: every peer sees another mapping (hole punching cannot work).
    Symmetric,
}

impl std::str::FromStr for Nat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cone" => Ok(Nat::Cone),
            "symmetric" => Ok(Nat::Symmetric),
            _ => Err(format!("unknown NAT kind '{s}' (cone or symmetric)")),
        }
    }
}

/// A host of the lab: a namespace a process can run in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// The namespace name.
    pub ns: String,
    /// Its own address (public for a public host, private behind a home router).
    pub addr: Ipv4Addr,
    /// The address the internet sees it as: its own, or its router's WAN address.
    pub public_addr: Ipv4Addr,
}

/// One network namespace's runtime: futures spawned on [`NsRuntime::handle`] run on a thread
/// inside the namespace.
pub struct NsRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsRuntime {
    /// The runtime's handle.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Runs `fut` inside the namespace and waits for it.
    pub async fn run<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.handle.spawn(fut).await {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The lab: its namespaces and links.
pub struct Lab {
    /// `kl<pid>x<n>`.
    tag: String,
    /// Every namespace made, in creation order.
    namespaces: Vec<String>,
    /// The internet router's namespace.
    inet: String,
    /// Links made on the internet router so far.
    links: u8,
    /// Homes made so far.
    homes: u8,
}

static LABS: AtomicU32 = AtomicU32::new(0);

fn run(args: &[&str]) -> Result<String, LabError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::Command {
            command: args.join(" "),
            stderr: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `args` inside namespace `ns`.
fn in_ns(ns: &str, args: &[&str]) -> Result<String, LabError> {
    let mut all = vec!["ip", "netns", "exec", ns];
    all.extend_from_slice(args);
    run(&all)
}

fn listed_namespaces() -> Vec<String> {
    run(&["ip", "netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Turns on IPv4 forwarding in `ns` (`/proc/sys/net` shows the writer's namespace; no
/// `sysctl` binary needed).
fn forward(ns: &str) -> Result<(), LabError> {
    in_ns(ns, &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]).map(|_| ())
}

/// Gives `ifname` in `ns` the address `addr/24` and a default route via `gateway`.
fn address_with_route(
    ns: &str,
    ifname: &str,
    addr: Ipv4Addr,
    gateway: Ipv4Addr,
) -> Result<(), LabError> {
    in_ns(
        ns,
        &["ip", "addr", "add", &format!("{addr}/24"), "dev", ifname],
    )?;
    in_ns(
        ns,
        &["ip", "route", "add", "default", "via", &gateway.to_string()],
    )?;
    Ok(())
}

/// Says a lab test is skipped, on the real stderr: the test harness captures `eprintln!`
/// of passing tests, and a skip must never be silent.
pub fn say_skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "skipped: {why}");
}

/// Kills what runs in `ns` and deletes it.
fn remove_ns(ns: &str) {
    if let Ok(pids) = run(&["ip", "netns", "pids", ns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            let _ = crate::procs::signal(pid, crate::procs::Sig::Kill);
        }
    }
    let _ = run(&["ip", "netns", "del", ns]);
}

/// The pid in a lab namespace's name (`kl<pid>x…`).
fn owner_pid(ns: &str) -> Option<u32> {
    let rest = ns.strip_prefix(PREFIX)?;
    rest.split('x').next()?.parse().ok()
}

impl Lab {
    /// Whether labs can be made here; the error is one line saying why not.
    pub fn available() -> Result<(), String> {
        for tool in ["ip", "iptables"] {
            let found = std::env::var_os("PATH")
                .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
                || ["/usr/sbin", "/sbin"]
                    .iter()
                    .any(|d| PathBuf::from(d).join(tool).is_file());
            if !found {
                return Err(format!(
                    "`{tool}` is not installed (apt-get install iproute2 iptables)"
                ));
            }
        }
        if !rustix::process::geteuid().is_root() {
            return Err("network namespaces need root".to_owned());
        }
        let probe = format!(
            "{PREFIX}{}x{}-probe",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &probe]).map_err(|e| e.to_string())?;
        let iptables = in_ns(&probe, &["iptables", "-t", "nat", "-L", "-n"]);
        let _ = run(&["ip", "netns", "del", &probe]);
        iptables
            .map(|_| ())
            .map_err(|e| format!("iptables does not work in a namespace: {e}"))
    }

    /// A new lab with its internet router. Namespaces left by labs of dead processes are
    /// removed first.
    pub fn new() -> Result<Lab, LabError> {
        Lab::available().map_err(LabError::Unavailable)?;
        for ns in listed_namespaces() {
            if let Some(pid) = owner_pid(&ns)
                && !crate::procs::is_alive(pid)
            {
                remove_ns(&ns);
            }
        }
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{PREFIX}{}x{n}", std::process::id());
        let mut lab = Lab {
            inet: format!("{tag}-inet"),
            tag,
            namespaces: Vec::new(),
            links: 0,
            homes: 0,
        };
        let inet = lab.inet.clone();
        lab.add_ns(&inet)?;
        forward(&inet)?;
        Ok(lab)
    }

    fn add_ns(&mut self, ns: &str) -> Result<(), LabError> {
        run(&["ip", "netns", "add", ns])?;
        self.namespaces.push(ns.to_owned());
        in_ns(ns, &["ip", "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// A veth pair `a_if` in `a` and `b_if` in `b`, both up, made inside the namespaces.
    fn veth(&self, a: &str, a_if: &str, b: &str, b_if: &str) -> Result<(), LabError> {
        in_ns(
            a,
            &[
                "ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b,
            ],
        )?;
        in_ns(a, &["ip", "link", "set", a_if, "up"])?;
        in_ns(b, &["ip", "link", "set", b_if, "up"])?;
        Ok(())
    }

    /// A new link from the internet router to `ns` (interface `ifname` there): returns the
    /// address given to `ns` on it.
    fn internet_link(&mut self, ns: &str, ifname: &str) -> Result<Ipv4Addr, LabError> {
        self.links += 1;
        let k = self.links;
        let inet_if = format!("l{k}");
        self.veth(&self.inet.clone(), &inet_if, ns, ifname)?;
        in_ns(
            &self.inet,
            &[
                "ip",
                "addr",
                "add",
                &format!("198.18.{k}.1/24"),
                "dev",
                &inet_if,
            ],
        )?;
        let addr = Ipv4Addr::new(198, 18, k, 2);
        address_with_route(ns, ifname, addr, Ipv4Addr::new(198, 18, k, 1))?;
        Ok(addr)
    }

    /// A host with a public address on the internet.
    pub fn add_public(&mut self, name: &str) -> Result<Host, LabError> {
        let ns = format!("{}-{name}", self.tag);
        self.add_ns(&ns)?;
        let addr = self.internet_link(&ns, "eth0")?;
        Ok(Host {
            ns,
            addr,
            public_addr: addr,
        })
    }

    /// A router doing `nat` on the internet, with an empty LAN `192.168.<h>.0/24`; returns
    /// its namespace, LAN number and WAN address.
    fn add_router(&mut self, name: &str, nat: Nat) -> Result<(String, u8, Ipv4Addr), LabError> {
        self.homes += 1;
        let h = self.homes;
        let router = format!("{}-{name}r{h}", self.tag);
        self.add_ns(&router)?;
        let wan = self.internet_link(&router, "wan")?;
        forward(&router)?;
        let mut masquerade = vec![
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "wan",
            "-j",
            "MASQUERADE",
        ];
        if nat == Nat::Symmetric {
            masquerade.push("--random-fully");
        }
        in_ns(&router, &masquerade)?;
        for chain in ["FORWARD", "INPUT"] {
            in_ns(
                &router,
                &[
                    "iptables",
                    "-A",
                    chain,
                    "-i",
                    "wan",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "ESTABLISHED,RELATED",
                    "-j",
                    "ACCEPT",
                ],
            )?;
            in_ns(
                &router,
                &["iptables", "-A", chain, "-i", "wan", "-j", "DROP"],
            )?;
        }
        Ok((router, h, wan))
    }

    /// Puts `ns` on the LAN of `router` (interface `eth0`, address `192.168.<h>.2`).
    fn attach(&self, router: &str, h: u8, ns: &str) -> Result<Ipv4Addr, LabError> {
        let lan_if = "lan";
        self.veth(router, lan_if, ns, "eth0")?;
        in_ns(
            router,
            &[
                "ip",
                "addr",
                "add",
                &format!("192.168.{h}.1/24"),
                "dev",
                lan_if,
            ],
        )?;
        let addr = Ipv4Addr::new(192, 168, h, 2);
        address_with_route(ns, "eth0", addr, Ipv4Addr::new(192, 168, h, 1))?;
        Ok(addr)
    }

    /// A home: a host behind its own router doing `nat`.
    pub fn add_home(&mut self, name: &str, nat: Nat) -> Result<Host, LabError> {
        let (router, h, wan) = self.add_router(name, nat)?;
        let ns = format!("{}-{name}", self.tag);
        self.add_ns(&ns)?;
        let addr = self.attach(&router, h, &ns)?;
        Ok(Host {
            ns,
            addr,
            public_addr: wan,
        })
    }

    /// Moves `host` to another network: its link goes away and it comes up behind a new
    /// router doing `nat`, with another address. Processes in it keep running.
    pub fn move_host(&mut self, host: &Host, nat: Nat) -> Result<Host, LabError> {
        // Deleting one end of a veth pair deletes both.
        in_ns(&host.ns, &["ip", "link", "del", "eth0"])?;
        let name = host
            .ns
            .strip_prefix(&format!("{}-", self.tag))
            .unwrap_or("moved")
            .to_owned();
        let (router, h, wan) = self.add_router(&format!("{name}m"), nat)?;
        let addr = self.attach(&router, h, &host.ns)?;
        Ok(Host {
            ns: host.ns.clone(),
            addr,
            public_addr: wan,
        })
    }

    /// A command that runs `program` inside `host`'s namespace.
    pub fn command(
        &self,
        host: &Host,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &host.ns]).arg(program);
        cmd.kill_on_drop(true);
        cmd
    }

    /// A runtime whose futures run inside `host`'s namespace.
    pub fn runtime(&self, host: &Host) -> Result<NsRuntime, LabError> {
        let ns = host.ns.clone();
        let path = format!("/run/netns/{ns}");
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("ns-{ns}"))
            .spawn(move || {
                let entered = std::fs::File::open(&path).and_then(|f| {
                    use std::os::fd::AsFd;
                    rustix::thread::move_into_link_name_space(
                        f.as_fd(),
                        Some(rustix::thread::LinkNameSpaceType::Network),
                    )
                    .map_err(std::io::Error::from)
                });
                let rt = entered.and_then(|()| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                });
                match rt {
                    Ok(rt) => {
                        let _ = tx.send(Ok(rt.handle().clone()));
                        let _ = rt.block_on(stop_rx);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
            .map_err(|source| LabError::Setns {
                ns: host.ns.clone(),
                source,
            })?;
        let handle = rx
            .recv()
            .map_err(|_| LabError::Setns {
                ns: host.ns.clone(),
                source: std::io::Error::other("namespace thread ended"),
            })?
            .map_err(|source| LabError::Setns {
                ns: host.ns.clone(),
                source,
            })?;
        Ok(NsRuntime {
            handle,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The lab's namespaces.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            remove_ns(ns);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::net::{TcpListener, TcpStream, UdpSocket};

    const WAIT: Duration = Duration::from_secs(5);

    fn lab_or_skip() -> Option<Lab> {
        match Lab::available() {
            Ok(()) => Some(Lab::new().unwrap()),
            Err(why) => {
                say_skipped(&why);
                None
            }
        }
    }

    /// A UDP echo of the sender's address, inside `host`, on a free port.
    async fn observer(rt: &NsRuntime, bind: Ipv4Addr) -> u16 {
        rt.run(async move {
            let sock = UdpSocket::bind((bind, 0)).await.unwrap();
            let port = sock.local_addr().unwrap().port();
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok((_, from)) = sock.recv_from(&mut buf).await {
                    let _ = sock.send_to(from.to_string().as_bytes(), from).await;
                }
            });
            port
        })
        .await
    }

    /// From one socket in `rt`, asks each observer which source address it sees.
    async fn mapped_ports(rt: &NsRuntime, observers: Vec<(Ipv4Addr, u16)>) -> Vec<String> {
        rt.run(async move {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await.unwrap();
            let mut seen = Vec::new();
            for o in observers {
                sock.send_to(b"?", o).await.unwrap();
                let mut buf = [0u8; 64];
                let (n, _) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
                    .await
                    .expect("observer answers")
                    .unwrap();
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            seen
        })
        .await
    }

    #[tokio::test]
    async fn homes_reach_out_but_nothing_reaches_in_and_nat_kinds_differ() {
        let Some(mut lab) = lab_or_skip() else {
            return;
        };
        let p1 = lab.add_public("p1").unwrap();
        let p2 = lab.add_public("p2").unwrap();
        let cone = lab.add_home("c", Nat::Cone).unwrap();
        let sym = lab.add_home("s", Nat::Symmetric).unwrap();
        let (rp1, rp2) = (lab.runtime(&p1).unwrap(), lab.runtime(&p2).unwrap());
        let (rc, rs) = (lab.runtime(&cone).unwrap(), lab.runtime(&sym).unwrap());

        // TCP out of a home works; the public side sees the router's address.
        let (port, seen) = {
            let l = rp1
                .run(async { TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).await.unwrap() })
                .await;
            let port = l.local_addr().unwrap().port();
            let accept = rp1
                .handle()
                .spawn(async move { l.accept().await.unwrap().1 });
            let to = p1.addr;
            rc.run(async move { TcpStream::connect((to, port)).await.unwrap() })
                .await;
            (port, accept.await.unwrap())
        };
        assert_eq!(seen.ip(), std::net::IpAddr::V4(cone.public_addr));
        assert_ne!(port, 0);

        // Nothing gets in: neither the home host nor its router's WAN address.
        let home_l = rc
            .run(async { TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).await.unwrap() })
            .await;
        let home_port = home_l.local_addr().unwrap().port();
        for target in [cone.addr, cone.public_addr] {
            let r = rp1
                .run(async move {
                    tokio::time::timeout(
                        Duration::from_millis(500),
                        TcpStream::connect((target, home_port)),
                    )
                    .await
                })
                .await;
            assert!(!matches!(r, Ok(Ok(_))), "{target} reached from outside");
        }

        // Cone keeps one mapping per socket; symmetric makes one per destination.
        let o1 = (p1.addr, observer(&rp1, p1.addr).await);
        let o2 = (p2.addr, observer(&rp2, p2.addr).await);
        let c = mapped_ports(&rc, vec![o1, o2]).await;
        assert_eq!(c[0], c[1], "cone NAT: one mapping for both peers");
        assert!(c[0].starts_with(&cone.public_addr.to_string()));
        let s = mapped_ports(&rs, vec![o1, o2]).await;
        assert_ne!(s[0], s[1], "symmetric NAT: a mapping per peer");

        // Moving a host changes the address the internet sees.
        let moved = lab.move_host(&cone, Nat::Cone).unwrap();
        assert_ne!(moved.public_addr, cone.public_addr);
        assert_ne!(moved.addr, cone.addr);
        let after = mapped_ports(&rc, vec![o1]).await;
        assert!(
            after[0].starts_with(&moved.public_addr.to_string()),
            "{after:?}"
        );
        drop(home_l);
    }

    #[test]
    fn dropping_the_lab_removes_its_namespaces_even_after_a_panic() {
        if let Err(why) = Lab::available() {
            say_skipped(&why);
            return;
        }
        let made = std::sync::Mutex::new(Vec::new());
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut lab = Lab::new().unwrap();
            lab.add_home("h", Nat::Cone).unwrap();
            made.lock()
                .unwrap()
                .extend(lab.namespaces().iter().cloned());
            panic!("a test failing inside the lab");
        }));
        assert!(r.is_err());
        let made = made.into_inner().unwrap();
        assert_eq!(made.len(), 3, "internet, router and host: {made:?}");
        let left = listed_namespaces();
        for ns in made {
            assert!(!left.contains(&ns), "{ns} left behind");
        }
    }
}
