//! The AuthorizationPolicy objects an agent has seen: for each, the last
//! valid version (the one served) and what is wrong with the current one,
//! so an invalid edit never replaces a good policy; and the policy set
//! they make together with the policy files.

use std::collections::{BTreeMap, BTreeSet};

use kube::{ResourceExt, api::DynamicObject, runtime::watcher::Event};

use super::status::Condition;
use crate::policy::{
    Policy, PolicySet, Settings,
    object::{FieldError, from_object},
};

/// `(namespace, name)`.
pub type ObjectKey = (String, String);

#[derive(Debug, Default)]
pub struct Stored {
    /// `metadata.generation` of the current version.
    pub generation: Option<i64>,
    /// `metadata.uid`, for Events about the object.
    pub uid: Option<String>,
    /// The last valid version; kept while the current one is invalid.
    pub serving: Option<Policy>,
    /// Why the current version is refused.
    pub problem: Option<FieldError>,
    /// The `Accepted` condition in the object's status, as last seen.
    pub observed: Option<Condition>,
}

/// Every object of the watch, re-lists applied as a swap (objects that
/// disappeared during an outage are dropped at the end of the re-list).
#[derive(Debug, Default)]
pub struct Objects {
    live: BTreeMap<ObjectKey, Stored>,
    /// Keys listed so far, during a (re-)list.
    listing: Option<BTreeSet<ObjectKey>>,
    listed_once: bool,
    /// Invalid versions reported so far (each once).
    problems_reported: u64,
}

impl Objects {
    /// Whether a complete list has been seen and no re-list is under way
    /// (only then does the set stand for the cluster's policies).
    pub fn synced(&self) -> bool {
        self.listed_once && self.listing.is_none()
    }

    pub fn problems_reported(&self) -> u64 {
        self.problems_reported
    }

    pub fn get(&self, key: &ObjectKey) -> Option<&Stored> {
        self.live.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ObjectKey, &Stored)> {
        self.live.iter()
    }

    pub fn apply(&mut self, event: Event<DynamicObject>) {
        match event {
            Event::Init => self.listing = Some(BTreeSet::new()),
            Event::InitApply(object) => {
                let key = self.upsert(&object);
                if let Some(listing) = self.listing.as_mut() {
                    listing.insert(key);
                }
            }
            Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                self.live.retain(|key, _| listed.contains(key));
                self.listed_once = true;
            }
            Event::Apply(object) => {
                self.upsert(&object);
            }
            Event::Delete(object) => {
                let key = key_of(&object);
                if self.live.remove(&key).is_some() {
                    tracing::info!(policy = %id(&key), "AuthorizationPolicy deleted");
                }
            }
        }
    }

    /// Takes in the object's current version: served if valid, else
    /// recorded as the object's problem next to its last valid version.
    pub fn upsert(&mut self, object: &DynamicObject) -> ObjectKey {
        let key = key_of(object);
        let stored = self.live.entry(key.clone()).or_default();
        let generation = object.metadata.generation;
        stored.observed = Condition::accepted_in(object);
        match from_object(&key.0, &key.1, object.data.get("spec")) {
            Ok(policy) => {
                if stored.serving.as_ref() != Some(&policy) {
                    tracing::info!(policy = %id(&key), generation, "AuthorizationPolicy accepted");
                }
                stored.serving = Some(policy);
                stored.problem = None;
            }
            Err(problem) => {
                // Status updates come back as events too: report a problem
                // once per version, not once per event.
                if stored.problem.as_ref() != Some(&problem) || stored.generation != generation {
                    self.problems_reported += 1;
                    tracing::error!(
                        policy = %id(&key),
                        generation,
                        field = %problem.field,
                        reason = %problem.reason,
                        serving_last_valid = stored.serving.is_some(),
                        "invalid AuthorizationPolicy: {problem}"
                    );
                }
                stored.problem = Some(problem);
            }
        }
        stored.generation = generation;
        stored.uid.clone_from(&object.metadata.uid);
        key
    }
}

fn key_of(object: &DynamicObject) -> ObjectKey {
    (object.namespace().unwrap_or_default(), object.name_any())
}

pub fn id((namespace, name): &ObjectKey) -> String {
    format!("{namespace}/{name}")
}

/// The set to serve: the policy files' (`files`) and every object's
/// served version, and the `Accepted` condition each object should carry.
/// A policy file and an object with the same `namespace/name` conflict:
/// the file's is served and the object is told so. Files that failed to
/// load leave the set fail-closed, as without the cluster.
pub fn combine(
    files: &PolicySet,
    objects: &Objects,
    settings: &Settings,
) -> (PolicySet, BTreeMap<ObjectKey, Condition>) {
    let in_files: BTreeMap<String, String> = files
        .policies()
        .iter()
        .map(|p| {
            let origin = p.origin.as_ref().map(|o| o.display().to_string());
            (p.id(), origin.unwrap_or_else(|| "a policy file".into()))
        })
        .collect();
    let mut policies = files.policies().to_vec();
    let mut conditions = BTreeMap::new();
    for (key, stored) in objects.iter() {
        let conflict = in_files.get(&id(key));
        let condition = match (&stored.problem, conflict) {
            (Some(problem), _) => Condition::invalid(problem, stored.serving.is_some()),
            (None, Some(file)) => Condition::conflict(&id(key), file),
            (None, None) => Condition::accepted(),
        };
        conditions.insert(key.clone(), condition.observing(stored.generation));
        if conflict.is_none()
            && let Some(policy) = &stored.serving
        {
            policies.push(policy.clone());
        }
    }
    let set = if files.is_loaded() {
        // Conflicts were left out above, so names are unique.
        PolicySet::new(policies, settings.clone())
            .map(|set| set.with_files(files.files().to_vec()))
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot build the policy set; denying everything");
                PolicySet::fail_closed(settings.clone())
            })
    } else {
        PolicySet::fail_closed(settings.clone())
    };
    (set, conditions)
}

/// The served policies of two sets are the same (then nothing needs to be
/// re-evaluated).
pub fn same_policies(a: &PolicySet, b: &PolicySet) -> bool {
    a.is_loaded() == b.is_loaded() && a.policies() == b.policies() && a.files() == b.files()
}

/// For `ambit policy explain`: the objects of one list.
pub fn from_list(objects: &[DynamicObject]) -> Objects {
    let mut all = Objects::default();
    all.apply(Event::Init);
    for object in objects {
        all.apply(Event::InitApply(object.clone()));
    }
    all.apply(Event::InitDone);
    all
}

#[cfg(test)]
mod tests {
    use kube::api::{ApiResource, ObjectMeta};
    use serde_json::{Value, json};

    use super::*;
    use crate::policy::Action;

    fn object(name: &str, generation: i64, spec: Value) -> DynamicObject {
        let mut object = DynamicObject::new(name, &ApiResource::erase::<DummyKind>(&()));
        object.metadata = ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            generation: Some(generation),
            ..ObjectMeta::default()
        };
        object.data = json!({ "spec": spec });
        object
    }

    // Any kind will do for the tests' objects: only metadata and data count.
    type DummyKind = k8s_openapi::api::core::v1::ConfigMap;

    fn served(objects: &Objects) -> Vec<(String, Action)> {
        let (set, _) = combine(
            &PolicySet::new(Vec::new(), Settings::default()).expect("empty"),
            objects,
            &Settings::default(),
        );
        set.policies().iter().map(|p| (p.id(), p.action)).collect()
    }

    #[test]
    fn an_invalid_version_keeps_the_last_valid_one_served_and_says_so() {
        let mut objects = from_list(&[object("p", 1, json!({"action": "DENY", "rules": [{}]}))]);
        assert!(objects.synced());
        assert_eq!(served(&objects), [("shop/p".to_string(), Action::Deny)]);

        objects.apply(Event::Apply(object(
            "p",
            2,
            json!({"action": "DENY", "rules": [{"to": [{"ports": [0]}]}]}),
        )));
        assert_eq!(served(&objects), [("shop/p".to_string(), Action::Deny)]);
        let (_, conditions) = combine(
            &PolicySet::new(Vec::new(), Settings::default()).expect("empty"),
            &objects,
            &Settings::default(),
        );
        let condition = &conditions[&("shop".to_string(), "p".to_string())];
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            ("False", "Invalid")
        );
        assert_eq!(condition.observed_generation, Some(2));
        assert!(
            condition.message.contains("spec.rules[0].to[0].ports[0]")
                && condition.message.contains("last valid version"),
            "{}",
            condition.message
        );

        // Deleting it removes it, valid version and all.
        objects.apply(Event::Delete(object("p", 2, json!({}))));
        assert!(served(&objects).is_empty());
    }

    #[test]
    fn a_new_invalid_object_serves_nothing_and_a_relist_drops_what_disappeared() {
        let mut objects = from_list(&[object("good", 1, json!({"rules": [{}]}))]);
        objects.apply(Event::Apply(object("bad", 1, json!({"action": "DENY"}))));
        assert_eq!(served(&objects), [("shop/good".to_string(), Action::Allow)]);

        objects.apply(Event::Init);
        objects.apply(Event::InitApply(object(
            "bad",
            1,
            json!({"action": "DENY"}),
        )));
        assert!(!objects.synced(), "mid-relist");
        objects.apply(Event::InitDone);
        assert!(served(&objects).is_empty());
        assert_eq!(objects.iter().count(), 1);
    }

    #[test]
    fn a_file_policy_wins_over_an_object_of_the_same_name() {
        let file = crate::policy::parse_str(
            "apiVersion: ambit.dev/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {name: p, namespace: shop}\nspec: {rules: [{}]}\n",
            std::path::Path::new("/etc/ambit/p.yaml"),
        )
        .expect("valid");
        let files = PolicySet::new(file, Settings::default()).expect("set");
        let objects = from_list(&[object("p", 1, json!({"action": "DENY", "rules": [{}]}))]);
        let (set, conditions) = combine(&files, &objects, &Settings::default());
        assert_eq!(set.len(), 1);
        assert_eq!(set.policies()[0].action, Action::Allow);
        let condition = &conditions[&("shop".to_string(), "p".to_string())];
        assert_eq!(condition.reason, "Conflict");
        assert!(condition.message.contains("/etc/ambit/p.yaml"));
    }
}
