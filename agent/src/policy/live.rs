//! The policy in force, swapped whole on reload: a request sees one policy from start to end,
//! and a file that does not load leaves the old one in force.
#![forbid(unsafe_code)]

use std::sync::{Arc, RwLock};

use super::access::Access;
use super::brokering::Broker;
use super::gateway::Gateway;
use super::masking::Masker;
use super::{Policy, PolicyError};

/// A loaded policy with its compiled parts.
pub struct Active {
    pub policy: Policy,
    pub masker: Masker,
    pub access: Access,
    pub broker: Broker,
    /// `[gateway]` with its defaults worked out against the access rules.
    pub gateway: Gateway,
    /// `[tls]`, compiled.
    pub tls: super::tls::TlsRules,
}

pub struct Live {
    current: RwLock<Arc<Active>>,
    hash_key: [u8; 32],
}

impl Live {
    /// `hash_key` keys the masking `hash` action (equal values correlate on this host).
    pub fn new(policy: Policy, hash_key: [u8; 32]) -> Result<Self, PolicyError> {
        let active = compile(policy, hash_key)?;
        Ok(Live {
            current: RwLock::new(Arc::new(active)),
            hash_key,
        })
    }

    pub fn current(&self) -> Arc<Active> {
        self.current.read().expect("policy lock").clone()
    }

    /// Compiles `policy` and puts it in force; on error the old one stays.
    pub fn replace(&self, policy: Policy) -> Result<(), PolicyError> {
        let active = compile(policy, self.hash_key)?;
        *self.current.write().expect("policy lock") = Arc::new(active);
        Ok(())
    }
}

impl Active {
    /// The policy compiled as the agent would, except that its secrets file is not read (no
    /// brokered headers): for `mcptrail policy test`, which needs no root and no secrets.
    pub fn without_secrets(policy: Policy, hash_key: [u8; 32]) -> Result<Active, PolicyError> {
        build(policy, hash_key, false)
    }
}

fn compile(policy: Policy, hash_key: [u8; 32]) -> Result<Active, PolicyError> {
    build(policy, hash_key, true)
}

fn build(policy: Policy, hash_key: [u8; 32], secrets: bool) -> Result<Active, PolicyError> {
    let masker = policy.masker(hash_key).map_err(|e| PolicyError::Invalid {
        source_name: policy.source.clone(),
        message: e.to_string(),
    })?;
    let access = Access::new(&policy.access).map_err(|e| PolicyError::Invalid {
        source_name: policy.source.clone(),
        message: e.to_string(),
    })?;
    let broker = if secrets {
        Broker::new(&policy.brokering).map_err(|e| PolicyError::Invalid {
            source_name: policy.source.clone(),
            message: e.to_string(),
        })?
    } else {
        Broker::none()
    };
    let tls = super::tls::TlsRules::new(&policy.tls).map_err(|message| PolicyError::Invalid {
        source_name: policy.source.clone(),
        message,
    })?;
    Ok(Active {
        tls,
        gateway: Gateway::new(&policy.gateway, policy.access.can_refuse()),
        policy,
        masker,
        access,
        broker,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_swaps_the_whole_policy() {
        let live = Live::new(Policy::embedded_default().unwrap(), [0; 32]).unwrap();
        let before = live.current();
        assert!(before.masker.rule_count() >= 25);
        let small = Policy::parse(
            "version = 1\nname = \"small\"\n[[masking.rules]]\nname = \"t\"\npattern = 'T-\\d+'\n",
            "small.toml",
        )
        .unwrap();
        live.replace(small).unwrap();
        assert_eq!(live.current().policy.name, "small");
        assert_eq!(live.current().masker.rule_count(), 1);
        // A request that started before the swap still holds the old policy.
        assert_eq!(before.policy.name, "default");
    }
}
