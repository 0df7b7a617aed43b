//! The plugin's commands as the runtime calls them: ADD hands an enrolled
//! pod to the agent and succeeds only once it is captured; DEL releases,
//! best effort; CHECK and VERSION as the spec asks.

use std::{path::Path, time::Duration};

use serde_json::Value;

use crate::{
    enrollment::{self, Enrollment},
    protocol::{self, AgentRequest, AgentResponse, CallError, Command, Status},
    spec::{self, CniError, NetConf, PodRef, code},
};

/// What the runtime reads from CNI_* variables.
#[derive(Clone, Debug, Default)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub args: String,
}

impl Env {
    pub fn from_process() -> Self {
        let var = |name| std::env::var(name).unwrap_or_default();
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            args: var("CNI_ARGS"),
        }
    }
}

/// What to print on stdout, and whether the command succeeded.
#[derive(Debug)]
pub enum Outcome {
    Success(Option<Value>),
    Failure(CniError),
}

pub async fn run(env: &Env, stdin: &[u8]) -> Outcome {
    if env.command == "VERSION" {
        // VERSION's stdin carries only cniVersion (and may be empty).
        let version = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| {
                v.get("cniVersion")
                    .and_then(Value::as_str)
                    .map(String::from)
            })
            .unwrap_or_else(|| "1.0.0".into());
        return Outcome::Success(Some(spec::version_info(&version)));
    }
    let conf: NetConf = match serde_json::from_slice(stdin) {
        Ok(conf) => conf,
        Err(e) => {
            return Outcome::Failure(CniError::new(
                "1.0.0",
                code::DECODE_FAILED,
                format!("ambit-cni: cannot decode the network config: {e}"),
            ));
        }
    };
    if !spec::SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Outcome::Failure(CniError::new(
            &conf.cni_version,
            code::INCOMPATIBLE_VERSION,
            format!(
                "ambit-cni supports CNI versions {:?}, not {}",
                spec::SUPPORTED_VERSIONS,
                conf.cni_version
            ),
        ));
    }
    match env.command.as_str() {
        "ADD" => add(env, &conf).await,
        "DEL" => del(env, &conf).await,
        "CHECK" => check(env, &conf).await,
        other => Outcome::Failure(CniError::new(
            &conf.cni_version,
            code::INVALID_ENV,
            format!("ambit-cni: unknown CNI_COMMAND {other:?}"),
        )),
    }
}

async fn add(env: &Env, conf: &NetConf) -> Outcome {
    let Some(prev) = conf.prev_result.clone() else {
        return Outcome::Failure(CniError::new(
            &conf.cni_version,
            code::INVALID_CONFIG,
            "ambit-cni is a chained plugin: list it after the plugin that sets up the pod's \
             network (there is no prevResult)",
        ));
    };
    let Some(pod) = spec::pod_from_args(&env.args) else {
        // Not a Kubernetes pod: nothing for the mesh to do.
        return Outcome::Success(Some(prev));
    };
    let answer = ask_agent(env, conf, &pod, Command::Add).await;
    let failure = |code, msg: String| Outcome::Failure(CniError::new(&conf.cni_version, code, msg));
    match answer {
        Ok(AgentResponse {
            status: Status::Captured | Status::NotEnrolled,
            ..
        }) => Outcome::Success(Some(prev)),
        Ok(AgentResponse {
            status: Status::Error,
            message,
        }) => failure(
            code::AGENT_FAILED,
            format!(
                "the ambit agent could not capture pod {}/{}: {message}",
                pod.namespace, pod.name
            ),
        ),
        Ok(other) => failure(
            code::AGENT_PROTOCOL,
            format!(
                "the ambit agent answered ADD of pod {}/{} with {:?}",
                pod.namespace, pod.name, other.status
            ),
        ),
        Err(e @ CallError::Protocol { .. }) => failure(code::AGENT_PROTOCOL, e.to_string()),
        Err(e @ CallError::Unreachable { .. }) => without_agent(conf, &pod, prev, &e).await,
    }
}

/// The agent is unreachable: start the pod only if it is certainly outside the mesh.
async fn without_agent(conf: &NetConf, pod: &PodRef, prev: Value, agent: &CallError) -> Outcome {
    let enrollment = match &conf.kubeconfig {
        Some(kubeconfig) => enrollment::lookup(Path::new(kubeconfig), pod, timeout(conf)).await,
        None => Enrollment::Unknown("no kubeconfig in the ambit-cni config".into()),
    };
    let who = format!("{}/{}", pod.namespace, pod.name);
    match enrollment {
        Enrollment::NotEnrolled => {
            eprintln!("ambit-cni: {agent}; pod {who} is not in the mesh, passing it through");
            Outcome::Success(Some(prev))
        }
        Enrollment::Enrolled => Outcome::Failure(
            CniError::new(
                &conf.cni_version,
                code::ENROLLED_AGENT_DOWN,
                format!(
                    "pod {who} is in the mesh but the ambit agent is unreachable, so it cannot \
                     be captured and must not start: make the ambit agent on this node run \
                     (the kubelet retries)"
                ),
            )
            .details(agent.to_string()),
        ),
        Enrollment::Unknown(why) => Outcome::Failure(
            CniError::new(
                &conf.cni_version,
                code::ENROLLMENT_UNKNOWN,
                format!(
                    "the ambit agent is unreachable and whether pod {who} is in the mesh cannot \
                     be told without it ({why}): make the ambit agent on this node run (the \
                     kubelet retries)"
                ),
            )
            .details(agent.to_string()),
        ),
    }
}

async fn del(env: &Env, conf: &NetConf) -> Outcome {
    // DEL must succeed whatever the agent says: it is retried until it
    // does, and the agent also releases pods whose netns disappeared.
    if let Some(pod) = spec::pod_from_args(&env.args) {
        match ask_agent(env, conf, &pod, Command::Del).await {
            Ok(AgentResponse {
                status: Status::Released,
                ..
            }) => {}
            Ok(other) => eprintln!(
                "ambit-cni: DEL of {}/{}: agent answered {other:?}",
                pod.namespace, pod.name
            ),
            Err(e) => eprintln!("ambit-cni: DEL of {}/{}: {e}", pod.namespace, pod.name),
        }
    }
    Outcome::Success(None)
}

async fn check(env: &Env, conf: &NetConf) -> Outcome {
    if conf.prev_result.is_none() {
        return Outcome::Failure(CniError::new(
            &conf.cni_version,
            code::INVALID_CONFIG,
            "ambit-cni CHECK without prevResult",
        ));
    }
    if let Some(pod) = spec::pod_from_args(&env.args) {
        match ask_agent(env, conf, &pod, Command::Check).await {
            Ok(AgentResponse {
                status: Status::Error,
                message,
            }) => {
                return Outcome::Failure(CniError::new(
                    &conf.cni_version,
                    code::AGENT_FAILED,
                    format!(
                        "the ambit agent reports pod {}/{} is not as expected: {message}",
                        pod.namespace, pod.name
                    ),
                ));
            }
            Ok(_) => {}
            Err(e) => eprintln!("ambit-cni: CHECK of {}/{}: {e}", pod.namespace, pod.name),
        }
    }
    Outcome::Success(None)
}

async fn ask_agent(
    env: &Env,
    conf: &NetConf,
    pod: &PodRef,
    command: Command,
) -> Result<AgentResponse, CallError> {
    let request = AgentRequest {
        command,
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        namespace: pod.namespace.clone(),
        pod: pod.name.clone(),
        uid: pod.uid.clone(),
        ips: conf.previous_ips(),
        timeout_ms: conf.timeout_ms,
    };
    protocol::call(Path::new(&conf.agent_socket), &request, timeout(conf)).await
}

fn timeout(conf: &NetConf) -> Duration {
    Duration::from_millis(conf.timeout_ms)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn env(command: &str, args: &str) -> Env {
        Env {
            command: command.into(),
            container_id: "c".into(),
            netns: "/var/run/netns/none".into(),
            args: args.into(),
        }
    }

    fn failure_code(outcome: Outcome) -> u32 {
        match outcome {
            Outcome::Failure(e) => e.code,
            Outcome::Success(v) => panic!("succeeded with {v:?}"),
        }
    }

    #[tokio::test]
    async fn an_unsupported_version_is_refused() {
        let conf = json!({"cniVersion": "9.9.9", "name": "n", "type": "ambit-cni"});
        let outcome = run(&env("ADD", ""), conf.to_string().as_bytes()).await;
        assert_eq!(failure_code(outcome), code::INCOMPATIBLE_VERSION);
    }

    #[tokio::test]
    async fn add_without_a_previous_result_is_a_config_error() {
        let conf = json!({"cniVersion": "1.0.0", "name": "n", "type": "ambit-cni"});
        let args = "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b";
        let outcome = run(&env("ADD", args), conf.to_string().as_bytes()).await;
        assert_eq!(failure_code(outcome), code::INVALID_CONFIG);
    }

    #[tokio::test]
    async fn garbage_on_stdin_is_a_decode_error() {
        let outcome = run(&env("ADD", ""), b"not json").await;
        assert_eq!(failure_code(outcome), code::DECODE_FAILED);
    }

    #[tokio::test]
    async fn an_unreachable_agent_without_kubeconfig_cannot_tell() {
        let dir = tempfile::tempdir().unwrap();
        let prev =
            json!({"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "198.18.240.9/24"}]});
        let conf = json!({
            "cniVersion": "0.4.0", "name": "n", "type": "ambit-cni",
            "agentSocket": dir.path().join("none.sock"), "prevResult": prev,
        });
        let args = "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;K8S_POD_UID=u";
        let outcome = run(&env("ADD", args), conf.to_string().as_bytes()).await;
        assert_eq!(failure_code(outcome), code::ENROLLMENT_UNKNOWN);
    }
}
