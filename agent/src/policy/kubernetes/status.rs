//! The `Accepted` condition on each AuthorizationPolicy object.
//!
//! Every agent of the cluster watches the same objects and computes the
//! same condition, so they must not fight over it: an agent writes only
//! when the condition on the object differs from the one it computed
//! (comparing everything but `lastTransitionTime`), and keeps the object's
//! transition time when the status itself does not change. The first agent
//! to write wins; the others then see an equal condition and stay quiet.
//! The agent whose write lands also records a Warning Event for a refused
//! version, for `kubectl describe` (agents racing for the same write may
//! each record one).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, PoisonError},
};

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use super::{
    objects::{ObjectKey, Objects, id},
    resource,
};
use crate::policy::object::FieldError;

pub const CONDITION_TYPE: &str = "Accepted";

/// A `metav1.Condition` of type `Accepted`.
#[derive(Clone, Debug)]
pub struct Condition {
    /// `True` or `False`.
    pub status: String,
    pub reason: String,
    pub message: String,
    pub observed_generation: Option<i64>,
    pub last_transition_time: Option<String>,
}

/// Equal when an agent has nothing to write: the transition time is the
/// writer's clock, not part of what the condition says.
impl PartialEq for Condition {
    fn eq(&self, other: &Self) -> bool {
        self.status == other.status
            && self.reason == other.reason
            && self.message == other.message
            && self.observed_generation == other.observed_generation
    }
}

impl Condition {
    fn new(accepted: bool, reason: &str, message: String) -> Self {
        Self {
            status: if accepted { "True" } else { "False" }.into(),
            reason: reason.into(),
            message,
            observed_generation: None,
            last_transition_time: None,
        }
    }

    pub fn accepted() -> Self {
        Self::new(
            true,
            "Accepted",
            "valid; the agents serve this version".into(),
        )
    }

    pub fn invalid(problem: &FieldError, serving_last_valid: bool) -> Self {
        let consequence = if serving_last_valid {
            "the agents keep serving the last valid version of this policy"
        } else {
            "the agents serve nothing of this policy until it is fixed"
        };
        Self::new(false, "Invalid", format!("{problem}; {consequence}"))
    }

    pub fn conflict(policy: &str, file: &str) -> Self {
        Self::new(
            false,
            "Conflict",
            format!(
                "policy {policy} is also defined in the policy file {file}; \
                 the agents serve the file's version: rename one of them"
            ),
        )
    }

    pub fn observing(mut self, generation: Option<i64>) -> Self {
        self.observed_generation = generation;
        self
    }

    /// The `Accepted` condition in `object`'s status, if any.
    pub fn accepted_in(object: &DynamicObject) -> Option<Self> {
        let conditions = object.data.get("status")?.get("conditions")?.as_array()?;
        let condition = conditions
            .iter()
            .find(|c| c.get("type").and_then(Value::as_str) == Some(CONDITION_TYPE))?;
        let text = |field: &str| {
            condition
                .get(field)
                .and_then(Value::as_str)
                .map(String::from)
        };
        Some(Self {
            status: text("status")?,
            reason: text("reason").unwrap_or_default(),
            message: text("message").unwrap_or_default(),
            observed_generation: condition.get("observedGeneration").and_then(Value::as_i64),
            last_transition_time: text("lastTransitionTime"),
        })
    }

    fn to_json(&self) -> Value {
        json!({
            "type": CONDITION_TYPE,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "observedGeneration": self.observed_generation,
            "lastTransitionTime": self.last_transition_time,
        })
    }
}

/// Writes conditions that differ from the objects', one patch per object
/// at a time, in the background.
pub struct StatusWriter {
    client: Client,
    /// What was last sent per object (written or under way); removed again
    /// when a write fails, so the next review retries it.
    sent: Arc<Mutex<HashMap<ObjectKey, Condition>>>,
}

impl StatusWriter {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            sent: Arc::default(),
        }
    }

    /// Sends every condition in `wanted` that the object does not carry
    /// yet. Must be called within a Tokio runtime.
    pub fn review(&self, objects: &Objects, wanted: BTreeMap<ObjectKey, Condition>) {
        let mut sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        sent.retain(|key, _| wanted.contains_key(key));
        for (key, mut condition) in wanted {
            let observed = objects.get(&key).and_then(|s| s.observed.as_ref());
            if observed == Some(&condition) || sent.get(&key) == Some(&condition) {
                continue;
            }
            condition.last_transition_time = match observed {
                Some(o) if o.status == condition.status => o.last_transition_time.clone(),
                _ => Some(now_rfc3339()),
            };
            sent.insert(key.clone(), condition.clone());
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &key.0, &resource());
            let events: Api<Event> = Api::namespaced(self.client.clone(), &key.0);
            let uid = objects.get(&key).and_then(|s| s.uid.clone());
            let sent = Arc::clone(&self.sent);
            tokio::spawn(async move {
                let patch = json!({ "status": { "conditions": [condition.to_json()] } });
                match api
                    .patch_status(&key.1, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {
                        tracing::debug!(policy = %id(&key), "AuthorizationPolicy status written");
                        if condition.status == "False" {
                            let event = warning(&key, uid, &condition);
                            if let Err(e) = events.create(&PostParams::default(), &event).await {
                                tracing::warn!(policy = %id(&key), error = %e,
                                    "cannot record an Event for the AuthorizationPolicy");
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(policy = %id(&key), error = %e,
                            "cannot write the AuthorizationPolicy status; will retry");
                        let mut sent = sent.lock().unwrap_or_else(PoisonError::into_inner);
                        if sent.get(&key) == Some(&condition) {
                            sent.remove(&key);
                        }
                    }
                }
            });
        }
    }
}

/// A Warning Event about a refused version of the object `key`.
fn warning(key: &ObjectKey, uid: Option<String>, condition: &Condition) -> Event {
    let now = Time(Timestamp::now());
    Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}.", key.1)),
            namespace: Some(key.0.clone()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some(crate::policy::API_VERSION.into()),
            kind: Some(crate::policy::KIND.into()),
            namespace: Some(key.0.clone()),
            name: Some(key.1.clone()),
            uid,
            ..ObjectReference::default()
        },
        type_: Some("Warning".into()),
        reason: Some(condition.reason.clone()),
        message: Some(condition.message.clone()),
        source: Some(EventSource {
            component: Some(REPORTER.into()),
            host: None,
        }),
        reporting_component: Some(REPORTER.into()),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        ..Event::default()
    }
}

/// Who records the Events.
const REPORTER: &str = "ambit-agent";

/// Now, as Kubernetes writes times (RFC 3339, seconds, UTC).
fn now_rfc3339() -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time::OffsetDateTime::now_utc()
        .format(&format)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

#[cfg(test)]
mod tests {
    use kube::api::ApiResource;

    use super::*;

    #[test]
    fn the_condition_is_read_back_and_compared_without_its_time() {
        let mut object = DynamicObject::new(
            "p",
            &ApiResource::erase::<k8s_openapi::api::core::v1::ConfigMap>(&()),
        );
        let mut written = Condition::accepted().observing(Some(3));
        written.last_transition_time = Some(now_rfc3339());
        object.data = json!({ "status": { "conditions": [
            { "type": "Other", "status": "False" },
            written.to_json(),
        ]}});
        let read = Condition::accepted_in(&object).expect("present");
        assert_eq!(read.last_transition_time, written.last_transition_time);
        assert_eq!(read, Condition::accepted().observing(Some(3)));
        assert_ne!(read, Condition::accepted().observing(Some(4)));
        assert!(now_rfc3339().ends_with('Z'));
    }
}
