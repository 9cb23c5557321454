{{/* Common names and labels. */}}
{{- define "railnet.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "railnet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "railnet.labels" -}}
app.kubernetes.io/name: {{ include "railnet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "railnet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "railnet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "railnet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "railnet.socket" -}}
{{- printf "%s/agent.sock" (trimSuffix "/" .Values.agent.socketDir) -}}
{{- end -}}

{{- /* The API server's address for railnet's own pods, where the cluster's
       `kubernetes` Service is not reachable from pods (no kube-proxy yet,
       or a replacement that needs the agents first). */ -}}
{{- define "railnet.apiServerEnv" -}}
{{- with .Values.k8sServiceHost }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ . | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ $.Values.k8sServicePort | quote }}
{{- end }}
{{- end -}}
