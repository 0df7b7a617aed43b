{{/*
Names are fixed, not derived from the release name: the agent finds the CA
Service, the trust-bundle ConfigMap and the CA root Secret by these names
(docs/operations.md), so one release per cluster.
*/}}

{{- define "ambit.labels" -}}
app.kubernetes.io/name: ambit
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "ambit.image" -}}
{{ printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "ambit.rootNamespace" -}}
{{ default .Release.Namespace .Values.agent.rootNamespace }}
{{- end }}

{{/* The init container's `ambit-cni install` or `uninstall` command line. */}}
{{- define "ambit.cniCommand" -}}
- /usr/local/bin/ambit-cni
{{- if .Values.uninstall }}
- uninstall
{{- else }}
- install
{{- end }}
- --cni-conf-dir=/host/cni/net.d
- --cni-bin-dir=/host/cni/bin
{{- with .Values.cni.conflist }}
- --conflist={{ . }}
{{- end }}
{{- if not .Values.uninstall }}
- --agent-socket={{ .Values.agent.hostPaths.state }}/cni.sock
- --timeout-ms={{ .Values.cni.timeoutMs }}
{{- with .Values.cni.kubeconfig }}
- --kubeconfig={{ . }}
{{- end }}
{{- end }}
{{- end }}
