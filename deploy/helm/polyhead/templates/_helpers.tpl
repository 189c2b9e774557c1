{{/* Chart name, truncated to the 63 characters Kubernetes allows. */}}
{{- define "polyhead.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "polyhead.fullname" -}}
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

{{- define "polyhead.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "polyhead.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "polyhead.selectorLabels" -}}
app.kubernetes.io/name: {{ include "polyhead.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Where the auth Secret's token file is mounted. */}}
{{- define "polyhead.authTokenFile" -}}
/var/run/secrets/polyhead/{{ .Values.auth.secretKey }}
{{- end }}

{{/*
Keys of .Values.config the chart sets itself: a second copy would be a duplicate TOML key, which
the server refuses. The server reads `_` in a key as `-`.
*/}}
{{- define "polyhead.checkConfig" -}}
{{- range $key, $_ := .Values.config }}
{{- $long := replace "_" "-" $key }}
{{- if eq $long "listen" }}
{{- fail (printf "config.%s cannot be set: the chart listens on 0.0.0.0:service.grpcPort, which the Service and the probes use too; set service.grpcPort instead" $key) }}
{{- else if eq $long "metrics-listen" }}
{{- fail (printf "config.%s cannot be set: the chart serves metrics on 0.0.0.0:service.metricsPort, which the Service and the scrape annotations use too; set service.metricsPort instead" $key) }}
{{- else if has $long (list "tls-cert" "tls-key" "tls-client-ca") }}
{{- fail (printf "config.%s cannot be set: the chart serves plaintext gRPC, the only kind the kubelet's gRPC probes and the helm test pod speak; terminate TLS in front of the Service (an ingress or a service mesh)" $key) }}
{{- else if and (eq $long "auth-token-file") $.Values.auth.existingSecret }}
{{- fail (printf "config.%s cannot be set together with auth.existingSecret, which sets it" $key) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Seconds the kubelet waits before killing the pod: terminationGracePeriodSeconds when set, else the
preStop sleep + the drain timeout, rounded up + 5. The drain timeout is the server's: an
environment variable in env overrides config (the server's own precedence), and the server's
default, 30, applies when neither sets it. A drain read from a Secret or ConfigMap (valueFrom)
cannot be known here, so terminationGracePeriodSeconds must then be set.
*/}}
{{- define "polyhead.terminationGracePeriod" -}}
{{- $grace := .Values.terminationGracePeriodSeconds }}
{{- if or (kindIs "invalid" $grace) (eq (toString $grace) "") }}
{{- $drain := index .Values.config "drain-timeout-seconds" | default 30 }}
{{- range .Values.env }}
{{- if eq .name "POLYHEAD_DRAIN_TIMEOUT_SECONDS" }}
{{- if hasKey . "value" }}
{{- $drain = .value }}
{{- else }}
{{- fail "env sets POLYHEAD_DRAIN_TIMEOUT_SECONDS from a reference the chart cannot read: set terminationGracePeriodSeconds to cover preStopSleepSeconds and that drain" }}
{{- end }}
{{- end }}
{{- end }}
{{- add (int .Values.preStopSleepSeconds) ($drain | float64 | ceil | int) 5 }}
{{- else }}
{{- int $grace }}
{{- end }}
{{- end }}

{{/* The server's TOML configuration; listen and metrics addresses are fixed by the chart. */}}
{{- define "polyhead.config" -}}
{{- include "polyhead.checkConfig" . -}}
listen = "0.0.0.0:{{ .Values.service.grpcPort }}"
metrics-listen = "0.0.0.0:{{ .Values.service.metricsPort }}"
{{- if .Values.auth.existingSecret }}
auth-token-file = {{ include "polyhead.authTokenFile" . | quote }}
{{- end }}
{{- range $key, $value := .Values.config }}
{{- if kindIs "string" $value }}
{{ $key }} = {{ $value | quote }}
{{- else if and (kindIs "float64" $value) (eq $value (floor $value)) }}
{{ $key }} = {{ $value | int64 }}
{{- else }}
{{ $key }} = {{ $value }}
{{- end }}
{{- end }}
{{- end }}
