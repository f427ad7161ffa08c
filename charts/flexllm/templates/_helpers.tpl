{{/* Chart name. */}}
{{- define "flexllm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or the override. */}}
{{- define "flexllm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "flexllm.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "flexllm.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "flexllm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: flexllm
{{- end }}

{{/* Selector labels of one component (pass a dict: context, component). */}}
{{- define "flexllm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flexllm.name" .context }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "flexllm.operatorServiceAccount" -}}
{{- default (printf "%s-operator" (include "flexllm.fullname" .)) .Values.operator.serviceAccount.name }}
{{- end }}

{{- define "flexllm.workerServiceAccount" -}}
{{- default (printf "%s-worker" (include "flexllm.fullname" .)) .Values.worker.serviceAccount.name }}
{{- end }}

{{- define "flexllm.redisName" -}}
{{- printf "%s-redis" (include "flexllm.fullname" .) }}
{{- end }}

{{/* Redis URL the operator and the workers use. */}}
{{- define "flexllm.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s.%s.svc:6379/0" (include "flexllm.redisName" .) .Release.Namespace }}
{{- else }}
{{- required "externalRedis.url is required when redis.enabled is false" .Values.externalRedis.url }}
{{- end }}
{{- end }}

{{/* Secret holding the Redis password ("" when the external Redis has no auth). */}}
{{- define "flexllm.redisSecret" -}}
{{- if .Values.redis.enabled }}
{{- default (include "flexllm.redisName" .) .Values.redis.auth.existingSecret }}
{{- else }}
{{- .Values.externalRedis.existingSecret }}
{{- end }}
{{- end }}

{{- define "flexllm.redisSecretKey" -}}
{{- if .Values.redis.enabled }}{{ .Values.redis.auth.secretKey }}{{ else }}{{ .Values.externalRedis.secretKey }}{{ end }}
{{- end }}

{{- define "flexllm.adapterClaim" -}}
{{- if .Values.adapters.existingClaim }}
{{- .Values.adapters.existingClaim }}
{{- else if .Values.adapters.create }}
{{- printf "%s-adapters" (include "flexllm.fullname" .) }}
{{- end }}
{{- end }}

{{/* Non-root, no privilege escalation, read-only root: every container. */}}
{{- define "flexllm.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end }}

{{- define "flexllm.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
seccompProfile:
  type: RuntimeDefault
{{- end }}
