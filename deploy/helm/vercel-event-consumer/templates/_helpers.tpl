{{/* Names, labels and the values every template shares. */}}

{{- define "vec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* `<release>-<chart>`, or the release name alone when it already contains the chart name. */}}
{{- define "vec.fullname" -}}
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

{{- define "vec.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "vec.labels" -}}
helm.sh/chart: {{ include "vec.chart" . }}
{{ include "vec.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The worker's pods: selector labels plus the component. */}}
{{- define "vec.workerSelectorLabels" -}}
{{ include "vec.selectorLabels" . }}
app.kubernetes.io/component: worker
{{- end }}

{{/* The outbox relay's pods: selector labels plus its component. */}}
{{- define "vec.outboxSelectorLabels" -}}
{{ include "vec.selectorLabels" . }}
app.kubernetes.io/component: outbox-relay
{{- end }}

{{/* The DLQ replay Job's pod: selector labels plus its component. */}}
{{- define "vec.dlqReplaySelectorLabels" -}}
{{ include "vec.selectorLabels" . }}
app.kubernetes.io/component: dlq-replay
{{- end }}

{{/* The endpoint both ServiceMonitors scrape (the worker's and the outbox relay's): the
metrics Service's port, with the scrape settings of metrics.serviceMonitor. */}}
{{- define "vec.serviceMonitorEndpoints" -}}
{{- $sm := .Values.metrics.serviceMonitor -}}
- port: metrics
  path: /metrics
  interval: {{ $sm.interval }}
  scrapeTimeout: {{ $sm.scrapeTimeout }}
  {{- with $sm.relabelings }}
  relabelings:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $sm.metricRelabelings }}
  metricRelabelings:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{- define "vec.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vec.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "vec.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The Secret the chart makes for the broker URL and the fallback token. */}}
{{- define "vec.secretName" -}}
{{- include "vec.fullname" . }}
{{- end }}

{{- define "vec.amqpSecretName" -}}
{{- default (include "vec.secretName" .) .Values.amqp.existingSecret }}
{{- end }}

{{- define "vec.amqpSecretKey" -}}
{{- if .Values.amqp.existingSecret }}{{ .Values.amqp.existingSecretKey }}{{ else }}amqp-url{{ end }}
{{- end }}

{{- define "vec.tokensSecretName" -}}
{{- default (printf "%s-tokens" (include "vec.fullname" .)) .Values.tokens.existingSecret }}
{{- end }}

{{/* Whether the pods get CONSUMER_VERCEL_TOKEN, and from which Secret and key. */}}
{{- define "vec.fallbackTokenSet" -}}
{{- if or .Values.tokens.fallback.existingSecret .Values.tokens.fallback.token }}true{{ end }}
{{- end }}

{{- define "vec.fallbackSecretName" -}}
{{- default (include "vec.secretName" .) .Values.tokens.fallback.existingSecret }}
{{- end }}

{{- define "vec.fallbackSecretKey" -}}
{{- if .Values.tokens.fallback.existingSecret }}{{ .Values.tokens.fallback.existingSecretKey }}{{ else }}vercel-token{{ end }}
{{- end }}

{{/* Where the outbox relay's DSN comes from: an existing Secret, or the chart's. */}}
{{- define "vec.outboxSecretName" -}}
{{- default (include "vec.secretName" .) .Values.outbox.existingSecret }}
{{- end }}

{{- define "vec.outboxSecretKey" -}}
{{- if .Values.outbox.existingSecret }}{{ .Values.outbox.existingSecretKey }}{{ else }}outbox-dsn{{ end }}
{{- end }}

{{/* Seconds Kubernetes waits after SIGTERM: longer than the worker's own shutdown timeout. */}}
{{- define "vec.terminationGracePeriodSeconds" -}}
{{- $timeout := float64 .Values.config.shutdownTimeout }}
{{- $grace := .Values.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $grace }}
{{- add (ceil $timeout | int64) 5 }}
{{- else if le (float64 $grace) $timeout }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be greater than config.shutdownTimeout (%v): Kubernetes would kill deliveries still in flight" $grace $timeout) }}
{{- else }}
{{- $grace | int64 }}
{{- end }}
{{- end }}

{{/* Environment every container of the chart shares: the broker URL from its Secret. */}}
{{- define "vec.amqpEnv" -}}
- name: CONSUMER_AMQP_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "vec.amqpSecretName" . }}
      key: {{ include "vec.amqpSecretKey" . }}
{{- with .Values.amqp.tls }}
{{- if .existingSecret }}
- name: CONSUMER_AMQP_CAFILE
  value: {{ printf "%s/%s" .mountPath .caKey | quote }}
{{- if .certKey }}
- name: CONSUMER_AMQP_CERTFILE
  value: {{ printf "%s/%s" .mountPath .certKey | quote }}
{{- end }}
{{- if .keyKey }}
- name: CONSUMER_AMQP_KEYFILE
  value: {{ printf "%s/%s" .mountPath .keyKey | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The broker TLS Secret's volume mount (nothing without amqp.tls.existingSecret). */}}
{{- define "vec.amqpTlsMount" -}}
{{- with .Values.amqp.tls }}
{{- if .existingSecret }}
- name: amqp-tls
  mountPath: {{ .mountPath }}
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{/* The broker TLS Secret as a volume: only the keys named in values. */}}
{{- define "vec.amqpTlsVolume" -}}
{{- with .Values.amqp.tls }}
{{- if .existingSecret }}
- name: amqp-tls
  secret:
    secretName: {{ .existingSecret }}
    defaultMode: 0440
    items:
      {{- range compact (list .caKey .certKey .keyKey) }}
      - key: {{ . }}
        path: {{ . }}
      {{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Comma-separated seconds from a list of numbers. */}}
{{- define "vec.seconds" -}}
{{- $parts := list }}
{{- range . }}{{ $parts = append $parts (toString .) }}{{ end }}
{{- join "," $parts }}
{{- end }}

{{/* The `vercel-consumer` arguments of the DLQ replay Job, as a YAML list. */}}
{{- define "vec.dlqReplayArgs" -}}
{{- $replay := .Values.dlqReplay }}
{{- $f := $replay.filters }}
{{- $args := list "dlq" "replay" }}
{{- range $flag, $value := dict "--reason" $f.reason "--type" $f.type "--installation" $f.installation "--since" $f.since "--until" $f.until }}
{{- if $value }}{{ $args = concat $args (list $flag $value) }}{{ end }}
{{- end }}
{{- if not (kindIs "invalid" $f.status) }}{{ $args = concat $args (list "--status" ($f.status | toString)) }}{{ end }}
{{- if not (kindIs "invalid" $replay.limit) }}{{ $args = concat $args (list "--limit" ($replay.limit | int64 | toString)) }}{{ end }}
{{- if not (kindIs "invalid" $replay.wait) }}{{ $args = concat $args (list "--wait" ($replay.wait | toString)) }}{{ end }}
{{- if not (kindIs "invalid" $replay.rate) }}{{ $args = concat $args (list "--rate" ($replay.rate | toString)) }}{{ end }}
{{- if $replay.dryRun }}{{ $args = append $args "--dry-run" }}{{ end }}
{{- if $replay.toOrigin }}{{ $args = append $args "--to-origin" }}{{ end }}
{{- toYaml $args }}
{{- end }}
