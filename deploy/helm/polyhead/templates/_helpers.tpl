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

{{/* The server's TOML configuration; listen and metrics addresses are fixed by the chart. */}}
{{- define "polyhead.config" -}}
listen = "0.0.0.0:{{ .Values.service.grpcPort }}"
metrics-listen = "0.0.0.0:{{ .Values.service.metricsPort }}"
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
