{{/* Labels of every object. */}}
{{- define "agentwall.labels" -}}
app.kubernetes.io/name: agentwall
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* What selects the daemon's pods. */}}
{{- define "agentwall.selector" -}}
app.kubernetes.io/name: agentwall
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The image, by digest when one is given. */}}
{{- define "agentwall.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
{{- end -}}

{{/*
agentwall.yaml: the user's configuration with every path set to the chart's volumes.
*/}}
{{- define "agentwall.config" -}}
{{- $paths := dict
  "policy_dir" "/etc/agentwall/policies"
  "state_dir" "/var/lib/agentwall"
  "pin_dir" "/sys/fs/bpf/agentwall"
  "socket" "/run/agentwall/admin.sock"
  "cgroup_root" "agentwall"
  "metrics" (dict "listen" (printf "0.0.0.0:%v" .Values.metrics.port))
  "audit" (dict "key_file" "/etc/agentwall/keys/audit.key")
  "enrollment" (dict "socket" "/run/agentwall/enroll.sock")
  "workload" (dict "socket" "/run/agentwall/workload.sock")
  "decision" (dict "socket" "/run/agentwall/decision.sock")
-}}
{{- $bundles := list -}}
{{- range $domain, $_ := .Values.trustBundles -}}
{{- $bundles = append $bundles (dict "trust_domain" $domain "file" (printf "/etc/agentwall/bundles/%s.pem" $domain)) -}}
{{- end -}}
{{- $identity := dict "agent_dir" "/run/agentwall/agents" -}}
{{- if $bundles -}}
{{- $_ := set $identity "bundles" $bundles -}}
{{- end -}}
{{- $_ := set $paths "identity" $identity -}}
{{- $config := mergeOverwrite (deepCopy (.Values.config | default dict)) $paths -}}
{{- toYaml $config -}}
{{- end -}}
