//! Loading and attaching the kernel programs, and reading their maps.
//!
//! The object built from `tracer-ebpf` is embedded in the binary. Structure offsets come from
//! the kernel's BTF (see `btf.rs`) and watched ports go into the `PORTS` map, so one object
//! serves every configuration. Dropping [`Probes`] detaches and unloads everything.

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::BtfTracePoint,
};
use tracer_common::{KernelOffsets, loss};

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

    /// Loads the programs, fills the port map and attaches every hook.
    pub fn attach(ports: &[u16]) -> Result<Self> {
        let offsets = Self::kernel_offsets()?;
        let btf = Btf::from_sys_fs().context("loading kernel BTF (/sys/kernel/btf/vmlinux)")?;
        let mut loader = EbpfLoader::new();
        if std::env::var_os("TRACER_VERIFIER_LOG").is_some() {
            // For developing the kernel programs: the verifier's full reasoning on failure.
            loader
                .verifier_log_level(aya::VerifierLogLevel::VERBOSE | aya::VerifierLogLevel::STATS);
        }
        let mut ebpf = loader
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
