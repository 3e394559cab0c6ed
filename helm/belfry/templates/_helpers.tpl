{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "belfry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "belfry.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name of the node resources (the base is cut to 51 characters so every suffix fits in 63). */}}
{{- define "belfry.node.fullname" -}}
{{- printf "%s-node" (include "belfry.fullname" . | trunc 51 | trimSuffix "-") }}
{{- end }}

{{/* Name of the coordinator resources. */}}
{{- define "belfry.coordinator.fullname" -}}
{{- printf "%s-coordinator" (include "belfry.fullname" . | trunc 51 | trimSuffix "-") }}
{{- end }}

{{/* chart label value */}}
{{- define "belfry.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "belfry.labels" -}}
helm.sh/chart: {{ include "belfry.chart" . }}
{{ include "belfry.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: belfry
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels shared by all selectors of this release. */}}
{{- define "belfry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "belfry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of the node pods. */}}
{{- define "belfry.node.selectorLabels" -}}
{{ include "belfry.selectorLabels" . }}
app.kubernetes.io/component: node
{{- end }}

{{/* Selector labels of the coordinator pods. */}}
{{- define "belfry.coordinator.selectorLabels" -}}
{{ include "belfry.selectorLabels" . }}
app.kubernetes.io/component: coordinator
{{- end }}

{{/* ServiceAccount name. */}}
{{- define "belfry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "belfry.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Image reference. */}}
{{- define "belfry.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* Name of the Secret the chart creates (belfry.toml and/or the Redis URL). */}}
{{- define "belfry.secretName" -}}
{{- include "belfry.fullname" . }}
{{- end }}

{{/* Does the chart create its own Secret? (apps or Redis URL come from values) */}}
{{- define "belfry.createSecret" -}}
{{- if or (not .Values.config.existingSecret) (not .Values.redis.existingSecret) }}true{{- end }}
{{- end }}

{{/* Secret and key holding belfry.toml. */}}
{{- define "belfry.configSecretName" -}}
{{- .Values.config.existingSecret | default (include "belfry.secretName" .) }}
{{- end }}
{{- define "belfry.configSecretKey" -}}
{{- if .Values.config.existingSecret }}{{ .Values.config.existingSecretKey }}{{ else }}belfry.toml{{ end }}
{{- end }}

{{/* Secret and key holding the Redis URL. */}}
{{- define "belfry.redisSecretName" -}}
{{- .Values.redis.existingSecret | default (include "belfry.secretName" .) }}
{{- end }}
{{- define "belfry.redisSecretKey" -}}
{{- if .Values.redis.existingSecret }}{{ .Values.redis.existingSecretKey }}{{ else }}redis-url{{ end }}
{{- end }}

{{/* terminationGracePeriodSeconds of the nodes, checked against preStop + shutdown grace. */}}
{{- define "belfry.node.terminationGrace" -}}
{{- $pre := int .Values.node.preStopSleepSeconds }}
{{- $grace := int .Values.config.shutdownGraceSecs }}
{{- if kindIs "invalid" .Values.node.terminationGracePeriodSeconds }}
{{- add $pre $grace 10 }}
{{- else }}
{{- $t := int .Values.node.terminationGracePeriodSeconds }}
{{- if le $t (add $pre $grace) }}
{{- fail (printf "node.terminationGracePeriodSeconds (%d) must be larger than node.preStopSleepSeconds (%d) + config.shutdownGraceSecs (%d)" $t $pre $grace) }}
{{- end }}
{{- $t }}
{{- end }}
{{- end }}

{{/* One TOML value: JSON scalars and arrays of scalars are valid TOML. */}}
{{- define "belfry.tomlValue" -}}
{{- if kindIs "map" . }}
{{- fail "belfry.toml values must be scalars or lists of scalars, not maps" }}
{{- else if kindIs "invalid" . }}
{{- fail "belfry.toml values must not be null" }}
{{- else }}
{{- toJson . }}
{{- end }}
{{- end }}

{{/* The belfry.toml the chart renders from values. */}}
{{- define "belfry.configToml" -}}
# belfry.toml rendered by the belfry Helm chart. host, port, metrics_port and path_prefix are also set by flags.
host = "0.0.0.0"
port = {{ int .Values.node.port }}
metrics_port = {{ int .Values.node.metricsPort }}
path_prefix = {{ .Values.config.pathPrefix | toJson }}
max_connections = {{ int .Values.config.maxConnections }}
shutdown_grace_secs = {{ int .Values.config.shutdownGraceSecs }}
{{- range $k, $v := .Values.config.extra }}
{{ $k }} = {{ include "belfry.tomlValue" $v }}
{{- end }}
{{- if not .Values.config.apps }}
{{- fail "config.apps must list at least one app (or set config.existingSecret)" }}
{{- end }}
{{- range $i, $app := .Values.config.apps }}
{{- range $req := list "id" "key" "secret" }}
{{- if not (get $app $req) }}
{{- fail (printf "config.apps[%d].%s is required" $i $req) }}
{{- end }}
{{- end }}

[[apps]]
id = {{ $app.id | toString | toJson }}
key = {{ $app.key | toString | toJson }}
secret = {{ $app.secret | toString | toJson }}
{{- range $k, $v := omit $app "id" "key" "secret" "webhooks" }}
{{ $k }} = {{ include "belfry.tomlValue" $v }}
{{- end }}
{{- range $hook := $app.webhooks }}
[[apps.webhooks]]
{{- range $k, $v := $hook }}
{{ $k }} = {{ include "belfry.tomlValue" $v }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
