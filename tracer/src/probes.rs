//! Loading and attaching the kernel programs, and reading their maps.
//!
//! The object built from `tracer-ebpf` is embedded in the binary. Structure offsets come from
//! the kernel's BTF (see `btf.rs`) and watched ports go into the `PORTS` map, so one object
//! serves every configuration. Dropping [`Probes`] detaches and unloads everything.

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::BtfTracePoint,
};
use tracer_common::{KernelOffsets, SockState, loss, path_hash, setting};

use crate::btf::KernelBtf;

/// (program name in the object, BTF tracepoint it attaches to)
pub const PROGRAMS: &[(&str, &str)] = &[
    ("pgc_sock_send", "sock_send_length"),
    ("pgc_sock_recv", "sock_recv_length"),
    ("pgc_sock_state", "inet_sock_set_state"),
];

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

pub struct Probes {
    ebpf: Ebpf,
}

/// Kernel-side loss counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLosses {
    pub ring_full: u64,
    pub table_full: u64,
}

impl Probes {
    /// Reads the kernel's structure offsets from BTF.
    pub fn kernel_offsets() -> Result<KernelOffsets> {
        let btf = KernelBtf::from_sys_fs()?;
        btf.kernel_offsets()
            .context("kernel BTF lacks a structure member the probes read")
    }

    /// Loads the programs, fills the port map and attaches every hook. `max_connections`
    /// sizes the kernel's connection table.
    pub fn attach(ports: &[u16], max_connections: u32) -> Result<Self> {
        let offsets = Self::kernel_offsets()?;
        let btf = Btf::from_sys_fs().context("loading kernel BTF (/sys/kernel/btf/vmlinux)")?;
        let mut loader = EbpfLoader::new();
        if std::env::var_os("TRACER_VERIFIER_LOG").is_some() {
            // For developing the kernel programs: the verifier's full reasoning on failure.
            loader
                .verifier_log_level(aya::VerifierLogLevel::VERBOSE | aya::VerifierLogLevel::STATS);
        }
        let mut ebpf = loader
            .map_max_entries("SOCKS", max_connections)
            .btf(Some(&btf))
            .override_global("OFFSETS", &offsets, true)
            .load(OBJECT)
            .context("loading the eBPF object")?;

        let mut port_map: Array<&mut MapData, u8> = Array::try_from(
            ebpf.map_mut("PORTS")
                .ok_or_else(|| anyhow!("map PORTS missing from the object"))?,
        )?;
        for &port in ports {
            port_map
                .set(u32::from(port), 1, 0)
                .context("setting a watched port")?;
        }

        for (name, tracepoint) in PROGRAMS {
            let program: &mut BtfTracePoint = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                .try_into()?;
            program
                .load(tracepoint, &btf)
                .with_context(|| format!("loading {name} (tp_btf/{tracepoint})"))?;
            program
                .attach()
                .with_context(|| format!("attaching {name} to tp_btf/{tracepoint}"))?;
        }
        Ok(Self { ebpf })
    }

    /// Loads and attaches each program on its own, then removes it: `tracer check`.
    pub fn check_each() -> Vec<(&'static str, Result<()>)> {
        let prepared = Self::kernel_offsets().and_then(|offsets| {
            let btf = Btf::from_sys_fs().context("loading kernel BTF")?;
            Ok((offsets, btf))
        });
        PROGRAMS
            .iter()
            .map(|(name, tracepoint)| {
                let result = match &prepared {
                    Err(e) => Err(anyhow!("{e:#}")),
                    Ok((offsets, btf)) => (|| {
                        let mut ebpf = EbpfLoader::new()
                            .btf(Some(btf))
                            .override_global("OFFSETS", offsets, true)
                            .load(OBJECT)
                            .context("loading the eBPF object")?;
                        let program: &mut BtfTracePoint = ebpf
                            .program_mut(name)
                            .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                            .try_into()?;
                        program.load(tracepoint, btf).context("load")?;
                        program.attach().context("attach")?;
                        Ok(())
                    })(),
                };
                (*tracepoint, result)
            })
            .collect()
    }

    /// The hooks, as reported in the `ready` event.
    pub fn hook_names() -> Vec<String> {
        PROGRAMS
            .iter()
            .map(|(_, tp)| format!("tp_btf/{tp}"))
            .collect()
    }

    /// Takes the event ring buffer (once).
    pub fn take_ring(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or_else(|| anyhow!("map EVENTS missing or already taken"))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// The kernel's live state of a tracked connection.
    pub fn sock_state(&self, key: u64) -> Option<SockState> {
        let map: HashMap<&MapData, u64, SockState> =
            HashMap::try_from(self.ebpf.map("SOCKS")?).ok()?;
        map.get(&key, 0).ok()
    }

    /// Forgets a connection whose end the kernel cannot see (Unix sockets), unless the key
    /// already belongs to another socket.
    pub fn forget_sock(&mut self, key: u64, cookie: u64) -> Result<()> {
        let mut map: HashMap<&mut MapData, u64, SockState> = HashMap::try_from(
            self.ebpf
                .map_mut("SOCKS")
                .ok_or_else(|| anyhow!("map SOCKS missing"))?,
        )?;
        if map.get(&key, 0).is_ok_and(|s| s.cookie == cookie) {
            let _ = map.remove(&key);
        }
        Ok(())
    }

    /// Replaces the set of watched Unix socket paths; sockets judged before are re-judged.
    pub fn set_watched_unix(&mut self, paths: &[String], generation: u32) -> Result<()> {
        let mut map: HashMap<&mut MapData, u64, u8> = HashMap::try_from(
            self.ebpf
                .map_mut("WATCHED_UNIX")
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
                .map_mut("SETTINGS")
                .ok_or_else(|| anyhow!("map SETTINGS missing"))?,
        )?;
        map.set(index, value, 0)
            .context("writing a kernel setting")?;
        Ok(())
    }

    pub fn losses(&self) -> Result<KernelLosses> {
        let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
            self.ebpf
                .map("LOSSES")
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
