//! Loading and attaching the kernel programs, and reading their maps.
//!
//! The object built from `tracer-ebpf` is embedded in the binary. Structure offsets come from
//! the kernel's BTF (see `btf.rs`) and watched ports go into the `PORTS` map, so one object
//! serves every configuration and kernel; the I/O hooks are chosen by what the kernel has
//! ([`HookSet`]). Dropping [`Probes`] detaches and unloads everything.

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, FExit},
};
use std::os::fd::AsFd as _;

use tracer_common::{ChangedKeys, KernelOffsets, SockState, loss, map_name, path_hash, setting};

use crate::kernel::btf::KernelBtf;

/// How a program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attach {
    BtfTracepoint,
    FExit,
}

/// One kernel program and where it attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hook {
    /// Program name in the object.
    pub program: &'static str,
    attach: Attach,
    /// Tracepoint or kernel function.
    pub target: &'static str,
}

impl Hook {
    /// `tp_btf/<tracepoint>` or `fexit/<function>`, as `check` and the `ready` event say it.
    pub fn name(&self) -> String {
        let kind = match self.attach {
            Attach::BtfTracepoint => "tp_btf",
            Attach::FExit => "fexit",
        };
        format!("{kind}/{}", self.target)
    }

    fn load_and_attach(&self, ebpf: &mut Ebpf, btf: &Btf) -> Result<()> {
        let program = ebpf
            .program_mut(self.program)
            .ok_or_else(|| anyhow!("program {} missing from the object", self.program))?;
        match self.attach {
            Attach::BtfTracepoint => {
                let program: &mut BtfTracePoint = program.try_into()?;
                program.load(self.target, btf).context("load")?;
                program.attach().context("attach")?;
            }
            Attach::FExit => {
                let program: &mut FExit = program.try_into()?;
                program.load(self.target, btf).context("load")?;
                program.attach().context("attach")?;
            }
        }
        Ok(())
    }
}

/// The TCP state machine hook, the same on every kernel.
const STATE_HOOK: Hook = Hook {
    program: "pgc_sock_state",
    attach: Attach::BtfTracepoint,
    target: "inet_sock_set_state",
};

const TRACEPOINT_HOOKS: [Hook; 3] = [
    Hook {
        program: "pgc_sock_send",
        attach: Attach::BtfTracepoint,
        target: "sock_send_length",
    },
    Hook {
        program: "pgc_sock_recv",
        attach: Attach::BtfTracepoint,
        target: "sock_recv_length",
    },
    STATE_HOOK,
];

/// Sends are hooked below `sock_sendmsg`, which 6.1's compiler inlines into the syscalls.
const TRAMPOLINE_HOOKS: [Hook; 4] = [
    Hook {
        program: "pgc_tcp_sendmsg_exit",
        attach: Attach::FExit,
        target: "tcp_sendmsg",
    },
    Hook {
        program: "pgc_unix_sendmsg_exit",
        attach: Attach::FExit,
        target: "unix_stream_sendmsg",
    },
    Hook {
        program: "pgc_recvmsg_exit",
        attach: Attach::FExit,
        target: "sock_recvmsg",
    },
    STATE_HOOK,
];

/// The sets of I/O hooks (see `tracer-ebpf/src/io_hooks.rs`), best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookSet {
    /// BTF tracepoints `sock_send_length` / `sock_recv_length` (kernels after 6.1): cost nothing
    /// until a socket does I/O, and need no BPF trampolines.
    Tracepoints,
    /// fexit on `tcp_sendmsg`, `unix_stream_sendmsg` and `sock_recvmsg`, for kernels without
    /// those tracepoints (6.1, 5.15, ...): the same calls, through BPF trampolines.
    Trampolines,
}

/// Overrides the detection (`tracepoints` or `trampolines`): for tests and for working
/// around a kernel whose preferred hooks misbehave.
pub const HOOKS_ENV: &str = "TRACER_HOOKS";

/// The first tick generation ([`Probes::next_tick_generation`]): a socket not yet listed has
/// `seen_gen` 0, which no generation is.
pub const FIRST_TICK_GENERATION: u32 = 1;

impl HookSet {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tracepoints => "tracepoints",
            Self::Trampolines => "trampolines",
        }
    }

    /// The programs of this set, I/O hooks first (so that a connection never gets an open
    /// record before its I/O can be seen).
    pub fn hooks(self) -> &'static [Hook] {
        match self {
            Self::Tracepoints => &TRACEPOINT_HOOKS,
            Self::Trampolines => &TRAMPOLINE_HOOKS,
        }
    }

    /// The set this kernel gets, with the reason in words.
    pub fn choose(btf: &KernelBtf) -> Result<(Self, String)> {
        if let Some(forced) = std::env::var_os(HOOKS_ENV) {
            let set = match forced.to_str() {
                Some("tracepoints") => Self::Tracepoints,
                Some("trampolines") => Self::Trampolines,
                _ => bail!("{HOOKS_ENV} must be `tracepoints` or `trampolines`, not {forced:?}"),
            };
            return Ok((set, format!("forced by {HOOKS_ENV}")));
        }
        let tracepoints = ["sock_send_length", "sock_recv_length"];
        if tracepoints.iter().all(|t| btf.has_btf_tracepoint(t)) {
            return Ok((
                Self::Tracepoints,
                "the kernel has the sock_send_length / sock_recv_length tracepoints".into(),
            ));
        }
        if TRAMPOLINE_HOOKS
            .iter()
            .filter(|h| h.attach == Attach::FExit)
            .all(|h| btf.has_function(h.target))
        {
            return Ok((
                Self::Trampolines,
                "no sock_send_length / sock_recv_length tracepoints: \
                 fexit on tcp_sendmsg, unix_stream_sendmsg, sock_recvmsg"
                    .into(),
            ));
        }
        bail!(
            "this kernel has neither the sock_send_length / sock_recv_length tracepoints \
             nor BTF for tcp_sendmsg, unix_stream_sendmsg and sock_recvmsg (fexit)"
        )
    }
}

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

pub struct Probes {
    ebpf: Ebpf,
    hooks: HookSet,
}

/// Kernel-side loss counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLosses {
    pub ring_full: u64,
    pub table_full: u64,
}

/// What loading needs from the running kernel: its structure offsets, its BTF for aya, and
/// the hook set it gets.
struct KernelFacts {
    offsets: KernelOffsets,
    btf: Btf,
    hooks: HookSet,
    why: String,
}

impl KernelFacts {
    fn read() -> Result<Self> {
        let ours = KernelBtf::from_sys_fs()?;
        let offsets = ours
            .kernel_offsets()
            .context("kernel BTF lacks a structure member the probes read")?;
        let (hooks, why) = HookSet::choose(&ours)?;
        let btf = Btf::from_sys_fs().context("loading kernel BTF (/sys/kernel/btf/vmlinux)")?;
        Ok(Self {
            offsets,
            btf,
            hooks,
            why,
        })
    }

    fn loader(&self) -> EbpfLoader<'_> {
        let mut loader = EbpfLoader::new();
        if std::env::var_os("TRACER_VERIFIER_LOG").is_some() {
            // For developing the kernel programs: the verifier's full reasoning on failure.
            loader
                .verifier_log_level(aya::VerifierLogLevel::VERBOSE | aya::VerifierLogLevel::STATS);
        }
        loader
            .btf(Some(&self.btf))
            .override_global(map_name::OFFSETS, &self.offsets, true);
        loader
    }
}

impl Probes {
    /// Reads the kernel's structure offsets from BTF.
    pub fn kernel_offsets() -> Result<KernelOffsets> {
        let btf = KernelBtf::from_sys_fs()?;
        btf.kernel_offsets()
            .context("kernel BTF lacks a structure member the probes read")
    }

    /// The hook set this kernel gets and why (`tracer check`).
    pub fn hook_set() -> Result<(HookSet, String)> {
        HookSet::choose(&KernelBtf::from_sys_fs()?)
    }

    /// Loads the programs, fills the port map and attaches every hook of the set this
    /// kernel gets. `max_connections` sizes the kernel's connection table.
    pub fn attach(ports: &[u16], max_connections: u32) -> Result<Self> {
        let facts = KernelFacts::read()?;
        let mut ebpf = facts
            .loader()
            .map_max_entries(map_name::SOCKS, max_connections)
            .load(OBJECT)
            .context("loading the eBPF object")?;

        let mut port_map: Array<&mut MapData, u8> = Array::try_from(
            ebpf.map_mut(map_name::PORTS)
                .ok_or_else(|| anyhow!("map PORTS missing from the object"))?,
        )?;
        for &port in ports {
            port_map
                .set(u32::from(port), 1, 0)
                .context("setting a watched port")?;
        }

        let mut probes = Self {
            ebpf,
            hooks: facts.hooks,
        };
        // Before any hook runs: a new socket's `seen_gen` is 0, so it lists itself in the
        // first generation.
        probes.set_tick_generation(FIRST_TICK_GENERATION)?;
        for hook in probes.hooks.hooks() {
            hook.load_and_attach(&mut probes.ebpf, &facts.btf)
                .with_context(|| format!("{} ({})", hook.name(), hook.program))?;
        }
        log::info!("hooks: {} ({})", probes.hooks.name(), facts.why);
        Ok(probes)
    }

    /// Loads and attaches each program of this kernel's set on its own, then removes it:
    /// `tracer check`.
    pub fn check_each() -> Result<Vec<(String, Result<()>)>> {
        let facts = KernelFacts::read()?;
        Ok(facts
            .hooks
            .hooks()
            .iter()
            .map(|hook| {
                let result = facts
                    .loader()
                    .load(OBJECT)
                    .context("loading the eBPF object")
                    .and_then(|mut ebpf| hook.load_and_attach(&mut ebpf, &facts.btf));
                (hook.name(), result)
            })
            .collect())
    }

    /// The benchmark's calibration: empty programs on this kernel's I/O tracepoints, attached
    /// alone (the daemon never loads them). Detached when dropped.
    pub fn attach_stats_floor() -> Result<Self> {
        let facts = KernelFacts::read()?;
        if facts.hooks != HookSet::Tracepoints {
            bail!(
                "the calibration programs need the sock_send_length / sock_recv_length tracepoints"
            );
        }
        let mut ebpf = facts
            .loader()
            .load(OBJECT)
            .context("loading the eBPF object")?;
        for (program, target) in [
            ("pgc_floor_send", "sock_send_length"),
            ("pgc_floor_recv", "sock_recv_length"),
        ] {
            let hook = Hook {
                program,
                attach: Attach::BtfTracepoint,
                target,
            };
            hook.load_and_attach(&mut ebpf, &facts.btf)?;
        }
        Ok(Self {
            ebpf,
            hooks: facts.hooks,
        })
    }

    /// The attached hooks, as reported in the `ready` event.
    pub fn hook_names(&self) -> Vec<String> {
        self.hooks.hooks().iter().map(Hook::name).collect()
    }

    /// Takes the event ring buffer (once).
    pub fn take_ring(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(map_name::EVENTS)
            .ok_or_else(|| anyhow!("map EVENTS missing or already taken"))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// The kernel's live state of every tracked connection, by `SOCKS` key, read in batches
    /// (a few system calls for the whole table instead of one per connection: the idle tick
    /// of a host with 20,000 pooled connections must cost next to nothing).
    pub fn sock_states(&self, expected: usize) -> Result<rustc_hash::FxHashMap<u64, SockState>> {
        let map = self
            .ebpf
            .map(map_name::SOCKS)
            .ok_or_else(|| anyhow!("map SOCKS missing"))?;
        let data: &MapData = match map {
            aya::maps::Map::HashMap(data) => data,
            _ => return Err(anyhow!("map SOCKS is not a hash map")),
        };
        crate::kernel::map_batch::read_all::<u64, SockState>(data.fd().as_fd(), expected)
            .context("reading the kernel's connection table")
    }

    /// Starts tick generation `generation` (never 0): from now on the kernel programs list
    /// changed sockets in its slot.
    fn set_tick_generation(&mut self, generation: u32) -> Result<()> {
        self.set(setting::TICK_GENERATION, generation)
    }

    /// Ends tick generation `ended` and starts `next` (never 0). Returns the keys of the
    /// tracked sockets the kernel programs listed as changed in `ended`, sorted and without
    /// repeats; `None`: a slot overflowed, read the whole table.
    ///
    /// The slot `next` will fill is the one `ended - 1` filled: it is read once more (for
    /// sockets a program still running on another CPU listed after the last tick read it) and
    /// emptied before `next` starts. `ended`'s own slot is read but left as it is until then,
    /// so a program that took the generation just before the switch loses nothing.
    pub fn next_tick_generation(&mut self, ended: u32, next: u32) -> Result<Option<Vec<u64>>> {
        let late = self.changed_slot(next & 1, true)?;
        self.set_tick_generation(next)?;
        let listed = self.changed_slot(ended & 1, false)?;
        let (Some(mut keys), Some(late)) = (listed, late) else {
            return Ok(None);
        };
        keys.extend(late);
        keys.sort_unstable();
        keys.dedup();
        Ok(Some(keys))
    }

    /// The keys of every CPU's `CHANGED` slot `index` (`None` if one overflowed), and
    /// empties them when asked.
    fn changed_slot(&mut self, index: u32, empty: bool) -> Result<Option<Vec<u64>>> {
        let mut map: PerCpuArray<&mut MapData, ChangedKeys> = PerCpuArray::try_from(
            self.ebpf
                .map_mut(map_name::CHANGED)
                .ok_or_else(|| anyhow!("map CHANGED missing"))?,
        )?;
        let slots = map.get(&index, 0).context("reading the changed sockets")?;
        let mut keys = Vec::new();
        let mut overflowed = false;
        for slot in slots.iter() {
            match slot.listed() {
                Some(listed) => keys.extend_from_slice(listed),
                None => overflowed = true,
            }
        }
        if empty && (overflowed || !keys.is_empty()) {
            let cpus = slots.len();
            let zeroed = aya::maps::PerCpuValues::try_from(vec![ChangedKeys::EMPTY; cpus])
                .context("emptying the changed sockets")?;
            map.set(index, zeroed, 0)
                .context("emptying the changed sockets")?;
        }
        Ok((!overflowed).then_some(keys))
    }

    /// The kernel's live state of the tracked connections `keys`, one lookup each; a key
    /// that left the table is missing from the answer.
    pub fn sock_states_of(&self, keys: &[u64]) -> Result<rustc_hash::FxHashMap<u64, SockState>> {
        let map: HashMap<&MapData, u64, SockState> = HashMap::try_from(
            self.ebpf
                .map(map_name::SOCKS)
                .ok_or_else(|| anyhow!("map SOCKS missing"))?,
        )?;
        let mut states = rustc_hash::FxHashMap::default();
        states.reserve(keys.len());
        for &key in keys {
            match map.get(&key, 0) {
                Ok(state) => {
                    states.insert(key, state);
                }
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("reading a changed connection"),
            }
        }
        Ok(states)
    }

    /// The kernel's live state of a tracked connection.
    pub fn sock_state(&self, key: u64) -> Option<SockState> {
        let map: HashMap<&MapData, u64, SockState> =
            HashMap::try_from(self.ebpf.map(map_name::SOCKS)?).ok()?;
        map.get(&key, 0).ok()
    }

    /// Forgets a connection whose end the kernel cannot see (Unix sockets), unless the key
    /// already belongs to another socket.
    pub fn forget_sock(&mut self, key: u64, cookie: u64) -> Result<()> {
        let mut map: HashMap<&mut MapData, u64, SockState> = HashMap::try_from(
            self.ebpf
                .map_mut(map_name::SOCKS)
                .ok_or_else(|| anyhow!("map SOCKS missing"))?,
        )?;
        if map.get(&key, 0).is_ok_and(|s| s.cookie == cookie) {
            #[allow(
                clippy::let_underscore_must_use,
                reason = "an entry the kernel removed already is fine"
            )]
            let _ = map.remove(&key);
        }
        Ok(())
    }

    /// Replaces the set of watched Unix socket paths; sockets judged before are re-judged.
    pub fn set_watched_unix(&mut self, paths: &[String], generation: u32) -> Result<()> {
        let mut map: HashMap<&mut MapData, u64, u8> = HashMap::try_from(
            self.ebpf
                .map_mut(map_name::WATCHED_UNIX)
                .ok_or_else(|| anyhow!("map WATCHED_UNIX missing"))?,
        )?;
        let wanted: Vec<u64> = paths
            .iter()
            .map(|p| path_hash(p.as_bytes(), p.len()))
            .collect();
        let stale: Vec<u64> = map
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !wanted.contains(k))
            .collect();
        for key in stale {
            #[allow(
                clippy::let_underscore_must_use,
                reason = "an entry the kernel removed already is fine"
            )]
            let _ = map.remove(&key);
        }
        for hash in wanted {
            map.insert(hash, 1, 0)
                .context("adding a watched Unix socket path")?;
        }
        self.set(setting::UNIX_GENERATION, generation)
    }

    /// While connections found at start-up may still be adopted by the kernel programs.
    pub fn set_adopt_tcp(&mut self, on: bool) -> Result<()> {
        self.set(setting::ADOPT_TCP, u32::from(on))
    }

    fn set(&mut self, index: u32, value: u32) -> Result<()> {
        let mut map: Array<&mut MapData, u32> = Array::try_from(
            self.ebpf
                .map_mut(map_name::SETTINGS)
                .ok_or_else(|| anyhow!("map SETTINGS missing"))?,
        )?;
        map.set(index, value, 0)
            .context("writing a kernel setting")?;
        Ok(())
    }

    pub fn losses(&self) -> Result<KernelLosses> {
        let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(map_name::LOSSES)
                .ok_or_else(|| anyhow!("map LOSSES missing"))?,
        )?;
        let sum = |index: u32| -> Result<u64> {
            Ok(map
                .get(&index, 0)?
                .iter()
                .copied()
                .fold(0u64, u64::wrapping_add))
        };
        Ok(KernelLosses {
            ring_full: sum(loss::RING_FULL)?,
            table_full: sum(loss::TABLE_FULL)?,
        })
    }
}
