//! Member offsets of kernel structures, read from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`).
//!
//! Rust eBPF programs have no CO-RE field relocations, so the daemon looks up the few
//! offsets the programs need and passes them in at load time. Only what that needs is
//! parsed: the type section's records, struct/union members, anonymous members followed.

use std::collections::{HashMap, HashSet};
use thiserror::Error;
use tracer_common::KernelOffsets;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF data (bad magic or header)")]
    BadHeader,
    #[error("BTF data truncated at byte {0}")]
    Truncated(usize),
    #[error("unknown BTF kind {0}")]
    UnknownKind(u32),
    #[error("struct {0} not found in kernel BTF")]
    NoStruct(String),
    #[error("member {1} of struct {0} not found in kernel BTF")]
    NoMember(String, String),
}

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
}

struct Composite {
    members: Vec<Member>,
}

/// The struct and union types of a BTF blob, by type id.
pub struct KernelBtf {
    strings: Vec<u8>,
    composites: HashMap<u32, Composite>,
    by_name: HashMap<String, u32>,
    /// Names of typedefs (a BTF tracepoint `T` has `btf_trace_T`) and functions (what
    /// fentry / fexit attach to).
    typedefs: HashSet<String>,
    functions: HashSet<String>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    let bytes = data.get(at..at + 4).ok_or(BtfError::Truncated(at))?;
    Ok(u32::from_le_bytes(bytes.try_into().expect("4 bytes")))
}

impl KernelBtf {
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.len() < 24 || data[0..2] != [0x9f, 0xeb] {
            return Err(BtfError::BadHeader);
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let types = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Truncated(hdr_len + type_off + type_len))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Truncated(hdr_len + str_off + str_len))?
            .to_vec();

        let mut btf = Self {
            strings,
            composites: HashMap::new(),
            by_name: HashMap::new(),
            typedefs: HashSet::new(),
            functions: HashSet::new(),
        };
        let mut at = 0;
        let mut type_id = 1u32;
        while at < types.len() {
            let name_off = u32_at(types, at)?;
            let info = u32_at(types, at + 4)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            at += 12;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                2 | 7..=12 | 16 | 18 => 0,
                other => return Err(BtfError::UnknownKind(other)),
            };
            if kind == KIND_STRUCT || kind == KIND_UNION {
                let mut members = Vec::with_capacity(vlen);
                for i in 0..vlen {
                    let m = at + i * 12;
                    let raw_offset = u32_at(types, m + 8)?;
                    members.push(Member {
                        name_off: u32_at(types, m)?,
                        type_id: u32_at(types, m + 4)?,
                        // With kind_flag the top 8 bits hold a bitfield size.
                        bit_offset: if kind_flag {
                            raw_offset & 0xff_ffff
                        } else {
                            raw_offset
                        },
                    });
                }
                if name_off != 0 && vlen > 0 {
                    let name = btf.string(name_off).to_owned();
                    btf.by_name.entry(name).or_insert(type_id);
                }
                btf.composites.insert(type_id, Composite { members });
            }
            if kind == KIND_TYPEDEF && name_off != 0 {
                btf.typedefs.insert(btf.string(name_off).to_owned());
            }
            if kind == KIND_FUNC && name_off != 0 {
                btf.functions.insert(btf.string(name_off).to_owned());
            }
            if at + extra > types.len() {
                return Err(BtfError::Truncated(at + extra));
            }
            at += extra;
            type_id += 1;
        }
        Ok(btf)
    }

    pub fn from_sys_fs() -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let data = std::fs::read(VMLINUX_BTF).with_context(|| format!("reading {VMLINUX_BTF}"))?;
        Ok(Self::parse(&data)?)
    }

    fn string(&self, offset: u32) -> &str {
        let tail = self.strings.get(offset as usize..).unwrap_or_default();
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        std::str::from_utf8(&tail[..end]).unwrap_or("")
    }

    /// Whether the kernel has the BTF tracepoint `name` (its `btf_trace_<name>` typedef).
    pub fn has_btf_tracepoint(&self, name: &str) -> bool {
        self.typedefs.contains(&format!("btf_trace_{name}"))
    }

    /// Whether the kernel's BTF describes function `name` (it can take fentry / fexit).
    pub fn has_function(&self, name: &str) -> bool {
        self.functions.contains(name)
    }

    /// Byte offset of `member` in `strukt`, looking inside anonymous unions and structs.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let id = *self
            .by_name
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        self.find_member(id, member, 0, 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoMember(strukt.to_owned(), member.to_owned()))
    }

    fn find_member(&self, id: u32, member: &str, base_bits: u32, depth: u32) -> Option<u32> {
        let composite = self.composites.get(&id)?;
        if depth > 8 {
            return None;
        }
        for m in &composite.members {
            if m.name_off != 0 && self.string(m.name_off) == member {
                return Some(base_bits + m.bit_offset);
            }
        }
        composite
            .members
            .iter()
            .filter(|m| m.name_off == 0)
            .find_map(|m| self.find_member(m.type_id, member, base_bits + m.bit_offset, depth + 1))
    }

    /// The offsets the kernel programs read.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        let sc = |m| self.member_offset("sock_common", m);
        Ok(KernelOffsets {
            sock_common_daddr: sc("skc_daddr")?,
            sock_common_rcv_saddr: sc("skc_rcv_saddr")?,
            sock_common_dport: sc("skc_dport")?,
            sock_common_num: sc("skc_num")?,
            sock_common_family: sc("skc_family")?,
            sock_common_v6_daddr: sc("skc_v6_daddr")?,
            sock_common_v6_rcv_saddr: sc("skc_v6_rcv_saddr")?,
            sock_protocol: self.member_offset("sock", "sk_protocol")?,
            sock_type: self.member_offset("sock", "sk_type")?,
            task_flags: self.member_offset("task_struct", "flags")?,
            task_group_leader: self.member_offset("task_struct", "group_leader")?,
            task_start_boottime: self.member_offset("task_struct", "start_boottime")?,
            unix_sock_addr: self.member_offset("unix_sock", "addr")?,
            unix_sock_peer: self.member_offset("unix_sock", "peer")?,
            unix_address_len: self.member_offset("unix_address", "len")?,
            unix_address_name: self.member_offset("unix_address", "name")?,
            pt_regs_orig_ax: self.member_offset("pt_regs", "orig_ax")?,
            pt_regs_di: self.member_offset("pt_regs", "di")?,
            pt_regs_si: self.member_offset("pt_regs", "si")?,
            pt_regs_dx: self.member_offset("pt_regs", "dx")?,
            socket_sk: self.member_offset("socket", "sk")?,
            sock_common_state: sc("skc_state")?,
        })
    }
}

#[cfg(test)]
mod tests;
