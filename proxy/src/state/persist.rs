//! The state file (SPEC §4.6): runtime changes survive a restart or a crash.
//!
//! Every acknowledged change is written before the acknowledgement: to a temporary file in the
//! same directory, fsync-ed, renamed over the old file, and the directory fsync-ed, so after a
//! crash the file is either the old state or the new one, never a torn mix. A file that cannot
//! be parsed is moved aside as `<file>.corrupt-<unix time>` and reported loudly; the proxy then
//! starts from the config's `active` pools rather than refusing to start.
//!
//! Instance lists changed at run time (`pool set`) are saved together with the config's list
//! at that time: on restart the saved list wins unless the config's list was edited since (then
//! the operator's newer intent, the file, wins).
//!
//! Also kept: each upstream's rollout (so a restart mid-rollout resumes at the same step), its
//! last automatic rollback (so `status` still says why), the pool owning the highest sticky
//! buckets, and the sticky-cookie key (so cookies issued before a restart stay valid).

use super::{Restored, Snapshot};
use crate::canary::rollout::Rollout;
use crate::routing::sticky::StickyKey;
use crate::routing::weights;
use crate::upstream::Runtime;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use switchyard_config::{Config, InstanceAddr};
use switchyard_control::protocol::RollbackInfo;
use switchyard_control::Weights;

const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    upstreams: BTreeMap<String, UpstreamRecord>,
    /// 32 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sticky_key: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct UpstreamRecord {
    generation: u64,
    weights: Weights,
    #[serde(default)]
    previous: Option<Weights>,
    #[serde(default)]
    pools: BTreeMap<String, PoolRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    buckets: Option<Vec<(String, u32)>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rollout: Option<Rollout>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_rollback: Option<RollbackInfo>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PoolRecord {
    /// The instances in effect.
    instances: Vec<String>,
    /// The config's list when this was saved.
    config_instances: Vec<String>,
}

/// Write the snapshot's runtime state durably (temp + fsync + rename + fsync dir).
pub(crate) fn save(path: &Path, snap: &Snapshot) -> std::io::Result<()> {
    let file = StateFile {
        version: VERSION,
        upstreams: snap
            .upstreams
            .iter()
            .map(|u| {
                let pools = u
                    .pools
                    .iter()
                    .map(|p| {
                        let config_instances = u
                            .config
                            .pool(&p.pool.name)
                            .map(|pc| pc.instances.iter().map(|a| a.to_string()).collect())
                            .unwrap_or_default();
                        (
                            p.pool.name.clone(),
                            PoolRecord {
                                instances: p.instances.iter().map(|i| i.label.clone()).collect(),
                                config_instances,
                            },
                        )
                    })
                    .collect();
                let rt = u.runtime();
                (
                    u.name().to_string(),
                    UpstreamRecord {
                        generation: rt.generation,
                        weights: rt.weights,
                        previous: rt.previous,
                        pools,
                        base: rt.base,
                        buckets: rt.buckets,
                        rollout: rt.rollout,
                        last_rollback: rt.last_rollback,
                    },
                )
            })
            .collect(),
        sticky_key: (!snap.sticky.shared).then(|| snap.sticky.to_hex()),
    };
    let mut bytes = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    let (dir, tmp) = switchyard_control::server::temp_beside(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Move a corrupt state file aside (`<file>.corrupt-<unix time>`) and say so loudly (SPEC §4.6).
fn set_aside(path: &Path, why: &str) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let aside = PathBuf::from(format!("{}.corrupt-{secs}", path.display()));
    let moved = std::fs::rename(path, &aside);
    tracing::error!(
        path = %path.display(),
        moved_to = %aside.display(),
        moved = moved.is_ok(),
        error = %why,
        "STATE FILE IS CORRUPT: it was moved aside and the config's active pools are used; check the routing with `proxyctl status`"
    );
}

/// Read the state file. Missing file: nothing to restore. Corrupt file: moved aside, logged,
/// nothing restored. Entries that no longer fit the config (unknown pools, weights not summing
/// to 100) are skipped with a warning.
pub(crate) fn load(path: &Path, config: &Config) -> Restored {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Restored::default(),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot read the state file; starting from the config's active pools");
            return Restored::default();
        }
    };
    let file: StateFile = match serde_json::from_slice(&text) {
        Ok(f) => f,
        Err(e) => {
            set_aside(path, &e.to_string());
            return Restored::default();
        }
    };
    let sticky = match file.sticky_key.as_deref().map(StickyKey::from_hex) {
        Some(None) => {
            set_aside(path, "sticky_key is not 32 hex digits");
            return Restored::default();
        }
        Some(Some(k)) => Some(k),
        None => None,
    };
    // Weights that break the rules (a weight above 100, a sum other than 100) were never
    // written by a proxy: the file was damaged or edited. Treat it as corrupt, not as a
    // mismatch with the config, so the evidence is kept.
    let broken = file.upstreams.iter().find_map(|(name, rec)| {
        let bad = weights::check(&rec.weights)
            .err()
            .or_else(|| rec.previous.as_ref().and_then(|p| weights::check(p).err()))?;
        Some(format!("upstream {name}: {bad}"))
    });
    if let Some(why) = broken {
        set_aside(path, &why);
        return Restored::default();
    }
    let mut out = BTreeMap::new();
    for (name, rec) in file.upstreams {
        let Some(uc) = config.upstream(&name) else {
            tracing::warn!(upstream = %name, "state file names an upstream the config no longer has; ignored");
            continue;
        };
        let pools = || uc.pools.iter().map(|p| p.name.as_str());
        let Some(weights) = weights::carry_over(&rec.weights, pools()) else {
            tracing::warn!(upstream = %name, weights = %weights::fmt_weights(&rec.weights), "saved weights give weight to a pool that is no longer in the config; using the config's active pool");
            continue;
        };
        let mut instances = BTreeMap::new();
        for pc in &uc.pools {
            let Some(pr) = rec.pools.get(&pc.name) else {
                continue;
            };
            let config_now: Vec<String> = pc.instances.iter().map(|a| a.to_string()).collect();
            if pr.config_instances != config_now {
                tracing::info!(upstream = %name, pool = %pc.name, "the config's instances changed since the last run; using the config");
                continue;
            }
            let parsed: Result<Vec<InstanceAddr>, _> = pr
                .instances
                .iter()
                .map(|s| s.parse::<InstanceAddr>())
                .collect();
            match parsed {
                Ok(list) => {
                    instances.insert(pc.name.clone(), list);
                }
                Err(e) => {
                    tracing::warn!(upstream = %name, pool = %pc.name, error = %e, "saved instances unusable; using the config");
                }
            }
        }
        let previous = rec.previous.and_then(|p| weights::carry_over(&p, pools()));
        let names: Vec<&str> = pools().collect();
        let now_ms = crate::canary::rollout::unix_ms();
        let rollout = rec.rollout.filter(|r| {
            let pool_weight = Some(weights.get(&r.pool).copied().unwrap_or(0));
            let ok = r.is_valid_for(&names, pool_weight, now_ms);
            if !ok {
                tracing::warn!(upstream = %name, pool = %r.pool, "the saved rollout does not fit (pool gone, steps or interval invalid, times ahead of the clock, or its weight not the pool's); it is dropped and the weights stay as saved");
            }
            ok
        });
        out.insert(
            name,
            Runtime {
                weights,
                instances,
                generation: rec.generation,
                previous,
                base: rec.base.filter(|b| names.contains(&b.as_str())),
                buckets: rec.buckets,
                rollout,
                last_rollback: rec.last_rollback,
            },
        );
    }
    Restored {
        upstreams: out,
        sticky,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Config {
        switchyard_config::parse(&format!(
            "listen: [{{addr: '127.0.0.1:0'}}]\nstate_file: {}/state.json\nupstreams:\n  app:\n    pools:\n      blue: ['127.0.0.1:1']\n      green: ['127.0.0.1:2']\n    active: blue\nroutes: [{{path_prefix: /, upstream: app}}]\n",
            dir.display()
        ))
        .unwrap()
    }

    /// Write a state file with these weights and rollback target (JSON), and load it.
    fn restore(cfg: &Config, weights: &str, previous: &str) -> BTreeMap<String, Runtime> {
        std::fs::write(
            &cfg.state_file,
            format!(
                r#"{{"version":1,"upstreams":{{"app":{{"generation":7,"weights":{weights},"previous":{previous}}}}}}}"#
            ),
        )
        .unwrap();
        load(&cfg.state_file, cfg).upstreams
    }

    #[test]
    fn weights_that_wrap_a_u32_are_rejected_not_restored() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        // 4294967295 + 101 wraps to 100 in u32 arithmetic.
        assert!(restore(&cfg, r#"{"blue":4294967295,"green":101}"#, "null").is_empty());
        assert!(!cfg.state_file.exists(), "kept aside as corrupt");
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("state.json.corrupt-")
            });
        assert!(aside);
    }

    #[test]
    fn valid_weights_are_restored_and_a_rollback_target_naming_a_removed_pool_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let r = restore(&cfg, r#"{"blue":10,"green":90}"#, r#"{"blue":100}"#);
        let app = &r["app"];
        assert_eq!(app.weights["green"], 90);
        assert_eq!(app.generation, 7);
        assert_eq!(app.previous.as_ref().unwrap()["blue"], 100);
        assert!(
            restore(
                &cfg,
                r#"{"blue":10,"green":90}"#,
                r#"{"blue":4294967295,"green":101}"#
            )
            .is_empty(),
            "a broken rollback target makes the file corrupt"
        );
        // A pool without weight that left the config does not invalidate the file.
        let r = restore(
            &cfg,
            r#"{"blue":100,"green":0,"gone":0}"#,
            r#"{"blue":0,"gone":100}"#,
        );
        assert_eq!(r["app"].weights["blue"], 100);
        assert_eq!(
            r["app"].previous, None,
            "its rollback target named a removed pool"
        );
    }
}
