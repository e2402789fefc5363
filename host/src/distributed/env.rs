//! Where this process stands in a launch by torchrun or Slurm, read from their environment variables.
//!
//! - torchrun (and anything that sets its variables): `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`,
//!   `MASTER_PORT`.
//! - Slurm, inside an `srun` step (`SLURM_STEP_ID` set; the batch script itself is one process, not a
//!   launch): `SLURM_PROCID`, `SLURM_LOCALID`, `SLURM_NTASKS`, and rank 0's host — `MASTER_ADDR` when the
//!   script exports it, else the first host of `SLURM_JOB_NODELIST` (`gpu[01-04],gpu07` → `gpu01`) —
//!   with `MASTER_PORT` or 29500 (torch's default).
//!
//! The port rank 0 listens on is `MASTER_PORT`, except under a torchrun whose agent serves its own store
//! there (`TORCHELASTIC_USE_AGENT_STORE=True`, torchrun's default in torch 2): then `MASTER_PORT + 1`.
//! `DUS_MASTER_PORT` overrides both.

use anyhow::{bail, ensure, Context, Result};

/// torch's default rendezvous port, used under Slurm when `MASTER_PORT` is not set.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Which launcher's variables were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// torchrun's `RANK` / `WORLD_SIZE` / ... .
    Torchrun,
    /// Slurm's `SLURM_PROCID` / `SLURM_NTASKS` / ... .
    Slurm,
}

/// This process's place in a launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Whose variables.
    pub launcher: Launcher,
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Rank on this machine (which GPU).
    pub local_rank: usize,
    /// Processes in the launch.
    pub world_size: usize,
    /// Host of rank 0.
    pub master_addr: String,
    /// Port rank 0 listens on for the others (see the module).
    pub master_port: u16,
}

impl LaunchEnv {
    /// From the process environment.
    pub fn from_process_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// From variables looked up with `var`; `None` when no launcher's variables are set.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let number = |key: &str| -> Result<Option<usize>> {
            var(key)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .with_context(|| format!("{key}={v:?} is not a non-negative integer"))
                })
                .transpose()
        };
        let port = |default: Option<u16>| -> Result<u16> {
            let parse = |key: &str, v: String| {
                v.trim()
                    .parse::<u16>()
                    .with_context(|| format!("{key}={v:?} is not a port number"))
            };
            if let Some(v) = var("DUS_MASTER_PORT") {
                return parse("DUS_MASTER_PORT", v);
            }
            let port = match var("MASTER_PORT") {
                Some(v) => parse("MASTER_PORT", v)?,
                None => default.context("MASTER_PORT is not set")?,
            };
            // torchrun's agent on the first node listens on MASTER_PORT itself (its TCP store).
            if var("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True") {
                return port.checked_add(1).context(
                    "MASTER_PORT is 65535 and torchrun's agent holds it: set DUS_MASTER_PORT to a free port",
                );
            }
            Ok(port)
        };
        let env = if let Some(world) = number("WORLD_SIZE")? {
            let rank = number("RANK")?.context("WORLD_SIZE is set but RANK is not")?;
            let local_rank = number("LOCAL_RANK")?.unwrap_or(rank);
            let master_addr =
                var("MASTER_ADDR").context("WORLD_SIZE is set but MASTER_ADDR is not")?;
            LaunchEnv {
                launcher: Launcher::Torchrun,
                rank,
                local_rank,
                world_size: world,
                master_addr,
                master_port: port(None)?,
            }
        } else if var("SLURM_STEP_ID")
            .or_else(|| var("SLURM_STEPID"))
            .is_some()
            && var("SLURM_PROCID").is_some()
        {
            let world = number("SLURM_NTASKS")?
                .or(number("SLURM_NPROCS")?)
                .context("SLURM_PROCID is set but SLURM_NTASKS is not")?;
            let master_addr = match var("MASTER_ADDR") {
                Some(a) => a,
                None => {
                    let list = var("SLURM_JOB_NODELIST")
                        .or_else(|| var("SLURM_NODELIST"))
                        .context("neither MASTER_ADDR nor SLURM_JOB_NODELIST is set")?;
                    expand_nodelist(&list)
                        .with_context(|| format!("SLURM_JOB_NODELIST={list:?}"))?
                        .into_iter()
                        .next()
                        .context("SLURM_JOB_NODELIST is empty")?
                }
            };
            LaunchEnv {
                launcher: Launcher::Slurm,
                rank: number("SLURM_PROCID")?.expect("checked above"),
                local_rank: number("SLURM_LOCALID")?.unwrap_or(0),
                world_size: world,
                master_addr,
                master_port: port(Some(DEFAULT_MASTER_PORT))?,
            }
        } else {
            return Ok(None);
        };
        ensure!(env.world_size >= 1, "a launch of 0 processes");
        ensure!(
            env.rank < env.world_size,
            "rank {} is not below the world size {}",
            env.rank,
            env.world_size
        );
        Ok(Some(env))
    }
}

/// The host names of a Slurm node list: `gpu[01-04],gpu07` → `gpu01 gpu02 gpu03 gpu04 gpu07`; ranges keep
/// their zero padding, brackets may hold lists (`n[1,3-5]`), and a name may have several bracket groups
/// (`rack[1-2]-n[1-2]`: every combination, in order).
pub fn expand_nodelist(list: &str) -> Result<Vec<String>> {
    let mut hosts = Vec::new();
    let mut item = String::new();
    let mut depth = 0;
    for c in list.trim().chars() {
        match c {
            '[' => depth += 1,
            ']' if depth == 0 => bail!("unbalanced ']'"),
            ']' => depth -= 1,
            ',' if depth == 0 => {
                hosts.extend(expand_name(&std::mem::take(&mut item))?);
                continue;
            }
            _ => {}
        }
        item.push(c);
    }
    ensure!(depth == 0, "unbalanced '['");
    hosts.extend(expand_name(&item)?);
    Ok(hosts)
}

fn expand_name(name: &str) -> Result<Vec<String>> {
    let name = name.trim();
    if name.is_empty() {
        bail!("an empty host name");
    }
    let Some(open) = name.find('[') else {
        return Ok(vec![name.to_string()]);
    };
    let close = open + name[open..].find(']').context("unbalanced '['")?;
    let (prefix, body, rest) = (&name[..open], &name[open + 1..close], &name[close + 1..]);
    let tails = if rest.is_empty() {
        vec![String::new()]
    } else {
        expand_name(rest)?
    };
    let mut out = Vec::new();
    for part in body.split(',') {
        let part = part.trim();
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let width = lo.len();
        let parse = |s: &str| -> Result<u64> {
            s.parse::<u64>()
                .with_context(|| format!("{s:?} in [{body}] is not a number"))
        };
        let (a, b) = (parse(lo)?, parse(hi)?);
        ensure!(a <= b, "range {part} runs backwards");
        for n in a..=b {
            for tail in &tails {
                out.push(format!("{prefix}{n:0width$}{tail}"));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<LaunchEnv>> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        LaunchEnv::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn slurm_node_lists_expand_in_order_with_padding() {
        assert_eq!(
            expand_nodelist("gpu[01-04],gpu07").unwrap(),
            ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]
        );
        assert_eq!(expand_nodelist("n[1,3-4]").unwrap(), ["n1", "n3", "n4"]);
        assert_eq!(
            expand_nodelist("rack[1-2]-n[08-09],login").unwrap(),
            ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09", "login"]
        );
        assert_eq!(expand_nodelist("node-7").unwrap(), ["node-7"]);
        assert_eq!(
            expand_nodelist("a[098-101]").unwrap(),
            ["a098", "a099", "a100", "a101"]
        );
        for bad in ["gpu[01-", "gpu]", "gpu[a-b]", "gpu[4-1]", "a,,b"] {
            assert!(expand_nodelist(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn torchrun_variables_are_read_and_checked() {
        let e = env(&[
            ("RANK", "5"),
            ("LOCAL_RANK", "1"),
            ("WORLD_SIZE", "8"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29400"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            e,
            LaunchEnv {
                launcher: Launcher::Torchrun,
                rank: 5,
                local_rank: 1,
                world_size: 8,
                master_addr: "node0".into(),
                master_port: 29400
            }
        );
        let err = |pairs: &[(&str, &str)]| format!("{:#}", env(pairs).unwrap_err());
        assert!(err(&[
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "1")
        ])
        .contains("RANK"));
        assert!(
            err(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "1")])
                .contains("MASTER_ADDR")
        );
        assert!(err(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "2"),
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "1")
        ])
        .contains("not below the world size"));
        assert!(err(&[("WORLD_SIZE", "two"), ("RANK", "0")]).contains("WORLD_SIZE=\"two\""));
        assert!(err(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "x")
        ])
        .contains("MASTER_PORT"));
        assert_eq!(env(&[]).unwrap(), None);
        // torchrun's agent serves its store on MASTER_PORT: rank 0 listens on the next port, or where told.
        let torchrun = [
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ];
        assert_eq!(env(&torchrun).unwrap().unwrap().master_port, 29401);
        let told = [&torchrun[..], &[("DUS_MASTER_PORT", "31000")]].concat();
        assert_eq!(env(&told).unwrap().unwrap().master_port, 31000);
        let last = [
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "65535"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ];
        assert!(format!("{:#}", env(&last).unwrap_err()).contains("DUS_MASTER_PORT"));
    }

    #[test]
    fn slurm_variables_inside_an_srun_step() {
        let e = env(&[
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "9"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_JOB_NODELIST", "gpu[03-04],gpu07"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (e.launcher, e.rank, e.local_rank, e.world_size),
            (Launcher::Slurm, 9, 1, 16)
        );
        assert_eq!(
            (e.master_addr.as_str(), e.master_port),
            ("gpu03", DEFAULT_MASTER_PORT)
        );
        // The script's own exports win.
        let e = env(&[
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_JOB_NODELIST", "gpu[03-04]"),
            ("MASTER_ADDR", "10.0.0.3"),
            ("MASTER_PORT", "12345"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.master_addr.as_str(), e.master_port), ("10.0.0.3", 12345));
        // The batch script itself (no step) is not a launch.
        assert_eq!(
            env(&[
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "8"),
                ("SLURM_JOB_NODELIST", "a")
            ])
            .unwrap(),
            None
        );
        // torchrun's variables win over Slurm's (torchrun started under srun).
        let e = env(&[
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_JOB_NODELIST", "a"),
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "m"),
            ("MASTER_PORT", "1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((e.launcher, e.rank), (Launcher::Torchrun, 3));
    }
}
